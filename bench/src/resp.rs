//! RESP2, the Redis wire format, and nothing else: encoding a command, taking one reply off a
//! byte buffer, and a connection that reads replies in the order the commands went out.
//!
//! Why not the `redis` crate: the harness needs two things a connection manager hides. The
//! publisher's confirmation is the XADD's reply, read in send order by a task of its own while
//! the sender keeps writing (the window of unconfirmed publishes is the harness's, not the
//! client's); and one write per batch of queued commands, so pipelining is what the harness
//! chose, not what a multiplexer happens to do. The few commands used here (XADD, MULTI/EXEC,
//! XGROUP, XREADGROUP, XACK, XDEL, SADD, SMEMBERS, PING) need only arrays of bulk strings out
//! and five reply types in, which is less code than adapting a client's reply types, and it
//! keeps the bench package's build (on a shared two-core machine) free of another dependency
//! tree.

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Replies larger than this end the connection (a 512-entry XREADGROUP batch of 16 KiB
/// bodies is about 8.5 MiB).
const MAX_REPLY: usize = 64 << 20;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    /// An error reply (`-ERR ...`): the command failed, the connection goes on.
    Error(String),
    Int(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array (a BLOCK that timed out, an aborted EXEC).
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The elements of an array reply (empty for a null array or a null bulk string); an error
    /// for anything else.
    pub fn into_array(self) -> Result<Vec<Value>> {
        match self {
            Value::Array(a) => Ok(a.unwrap_or_default()),
            Value::Bulk(None) => Ok(Vec::new()),
            Value::Error(e) => bail!("redis: {e}"),
            other => bail!("redis: expected an array, got {other:?}"),
        }
    }

    /// The bytes of a bulk or simple string.
    pub fn into_bytes(self) -> Result<Vec<u8>> {
        match self {
            Value::Bulk(Some(b)) => Ok(b),
            Value::Simple(s) => Ok(s.into_bytes()),
            Value::Error(e) => bail!("redis: {e}"),
            other => bail!("redis: expected a string, got {other:?}"),
        }
    }

    /// `Err` for an error reply, `Ok(self)` otherwise.
    pub fn ok(self) -> Result<Value> {
        match self {
            Value::Error(e) => bail!("redis: {e}"),
            v => Ok(v),
        }
    }
}

/// Appends `args` as one command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(args: &[A], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The line at the start of `buf` (without its CRLF) and the bytes it takes; `None` if the
/// CRLF has not arrived.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(text: &[u8]) -> Result<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| anyhow!("redis: bad number {:?}", String::from_utf8_lossy(text)))
}

/// Takes one reply off the front of `buf`: the reply and how many bytes it took, `Ok(None)` if
/// it is not complete yet (not an error), `Err` if the bytes are not RESP2.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>> {
    let Some((&kind, _)) = buf.split_first() else {
        return Ok(None);
    };
    let Some((head, used)) = line(&buf[1..]) else {
        return Ok(None);
    };
    let used = used + 1;
    let text = || String::from_utf8_lossy(head).into_owned();
    match kind {
        b'+' => Ok(Some((Value::Simple(text()), used))),
        b'-' => Ok(Some((Value::Error(text()), used))),
        b':' => Ok(Some((Value::Int(number(head)?), used))),
        b'$' => {
            let n = number(head)?;
            if n < 0 {
                return Ok(Some((Value::Bulk(None), used)));
            }
            let n = usize::try_from(n)?;
            if n > MAX_REPLY {
                bail!("redis: a {n}-byte string is over the reply limit");
            }
            if buf.len() < used + n + 2 {
                return Ok(None);
            }
            if &buf[used + n..used + n + 2] != b"\r\n" {
                bail!("redis: a bulk string without its CRLF");
            }
            Ok(Some((
                Value::Bulk(Some(buf[used..used + n].to_vec())),
                used + n + 2,
            )))
        }
        b'*' => {
            let n = number(head)?;
            if n < 0 {
                return Ok(Some((Value::Array(None), used)));
            }
            let n = usize::try_from(n)?;
            let mut items = Vec::with_capacity(n.min(4096));
            let mut at = used;
            for _ in 0..n {
                match parse(&buf[at..])? {
                    Some((v, k)) => {
                        items.push(v);
                        at += k;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(Some(items)), at)))
        }
        other => bail!("redis: unknown reply type {:?}", char::from(other)),
    }
}

/// The reading half of a connection: replies, in the order the commands were sent.
pub struct Replies {
    read: OwnedReadHalf,
    buf: Vec<u8>,
    /// Bytes of `buf` already parsed.
    start: usize,
}

impl Replies {
    /// The next reply. Errors when the connection ends or sends something that is not RESP2;
    /// an error reply is `Ok(Value::Error)`. Cancel-safe: bytes already read stay in the
    /// buffer for the next call.
    pub async fn next(&mut self) -> Result<Value> {
        loop {
            if let Some((v, used)) = parse(&self.buf[self.start..])? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(v);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.buf.len() > MAX_REPLY {
                bail!("redis: a reply over {MAX_REPLY} bytes");
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.read.read(&mut chunk).await.context("redis: reading")?;
            if n == 0 {
                bail!("redis: the server closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Opens a connection to `addr` (`HOST:PORT`), with `TCP_NODELAY` like the other clients.
pub async fn connect(addr: &str) -> Result<(Replies, OwnedWriteHalf)> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to redis at {addr}"))?;
    s.set_nodelay(true)?;
    let (read, write) = s.into_split();
    Ok((
        Replies {
            read,
            buf: Vec::new(),
            start: 0,
        },
        write,
    ))
}

/// A connection for request and reply, one at a time or a few pipelined.
pub struct Conn {
    pub replies: Replies,
    pub write: OwnedWriteHalf,
}

impl Conn {
    pub async fn open(addr: &str) -> Result<Conn> {
        let (replies, write) = connect(addr).await?;
        Ok(Conn { replies, write })
    }

    /// Sends `cmds` in one write and returns their replies in order (error replies included).
    /// Errors when the connection fails. Not cancel-safe: a cancelled call may leave a
    /// command half written or its reply unread, so the connection must then be dropped.
    pub async fn pipeline<A: AsRef<[u8]>>(&mut self, cmds: &[&[A]]) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for c in cmds {
            encode(c, &mut out);
        }
        self.write.write_all(&out).await.context("redis: writing")?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.replies.next().await?);
        }
        Ok(replies)
    }

    /// Sends one command and returns its reply; an error reply is an `Err`.
    pub async fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Value> {
        self.pipeline(&[args])
            .await?
            .pop()
            .ok_or_else(|| anyhow!("redis: no reply"))?
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_an_array_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&["XADD", "s", "*", "b", ""], &mut out);
        assert_eq!(
            out,
            b"*5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$1\r\nb\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn a_nested_reply_parses_and_reports_its_length() {
        let bytes = b"*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nb\r\n$2\r\nhi\r\n:7\r\n+OK\r\n";
        let (v, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len() - 5);
        assert_eq!(
            v,
            Value::Array(Some(vec![
                Value::Array(Some(vec![
                    Value::Bulk(Some(b"1-0".to_vec())),
                    Value::Array(Some(vec![
                        Value::Bulk(Some(b"b".to_vec())),
                        Value::Bulk(Some(b"hi".to_vec())),
                    ])),
                ])),
                Value::Int(7),
            ]))
        );
    }

    #[test]
    fn an_incomplete_reply_is_not_an_error() {
        let bytes = b"*2\r\n$3\r\nabc\r\n$5\r\nde";
        for end in 0..bytes.len() {
            assert_eq!(parse(&bytes[..end]).unwrap(), None, "prefix of {end} bytes");
        }
    }

    #[test]
    fn nulls_and_errors_are_values() {
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some((Value::Array(None), 5)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Value::Bulk(None), 5)));
        assert_eq!(
            parse(b"-BUSYGROUP x\r\n").unwrap(),
            Some((Value::Error("BUSYGROUP x".into()), 14))
        );
    }

    #[test]
    fn bytes_that_are_not_resp_are_an_error() {
        assert!(parse(b"?what\r\n").is_err());
        assert!(parse(b"$3\r\nabcXY").is_err());
    }
}
