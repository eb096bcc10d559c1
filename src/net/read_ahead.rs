//! A read-ahead buffer under a connection's WebSocket codec, held only while the peer sends
//! more than one read takes in.
//!
//! tungstenite asks for at most its read buffer's size in each read, and the broker keeps that
//! at 1 KiB, since the codec's buffer is resident memory for every idle connection (see
//! `net::connection`). A publisher of 16 KiB messages then cost 16 `recv` calls a message, and a
//! busy one of small messages one call per few frames. [`ReadAhead`] passes a read through
//! while reads come back short of what was asked; once one fills what the codec asked for (the
//! socket may hold more), it reads [`AHEAD`] bytes at a time into a buffer of its own and serves
//! the codec from there, and it gives that buffer back as soon as the socket has nothing more
//! (a read would wait). So an idle connection holds none, and a busy one one buffer.
//!
//! Writes pass through untouched. No state here but the buffer; the codec above sees the same
//! bytes in the same order, and an end of stream or an error as the socket reported it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read takes in while reading ahead.
const AHEAD: usize = 32 * 1024;

/// A stream whose reads are taken in [`AHEAD`] bytes at a time while the peer keeps them full.
pub struct ReadAhead<S> {
    inner: S,
    /// Empty while reads pass through; [`AHEAD`] bytes while reading ahead.
    buf: Vec<u8>,
    /// What of `buf` was read and not yet served: `buf[at..end]`.
    at: usize,
    end: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            at: 0,
            end: 0,
        }
    }

    /// Whether it holds a buffer now.
    #[cfg(test)]
    fn is_reading_ahead(&self) -> bool {
        !self.buf.is_empty()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            // Nothing asked: nothing read ahead and thrown away.
            return Poll::Ready(Ok(()));
        }
        if this.at == this.end {
            if this.buf.is_empty() {
                let asked = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                if out.filled().len() - before == asked {
                    this.buf = vec![0; AHEAD];
                }
                return Poll::Ready(Ok(()));
            }
            let mut ahead = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut ahead) {
                Poll::Pending => {
                    // The socket is drained: the buffer goes until reads fill up again.
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    // Nothing read is the end of the stream: nothing served says the same.
                    this.at = 0;
                    this.end = ahead.filled().len();
                }
            }
        }
        let n = out.remaining().min(this.end - this.at);
        out.put_slice(&this.buf[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A loopback connection: the client's end and the server's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Counts the reads that reached the socket and came back with bytes.
    struct Counted {
        inner: TcpStream,
        reads: usize,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            if buf.filled().len() > before {
                this.reads += 1;
            }
            r
        }
    }

    /// Reads `n` bytes from `r` the way the codec does: at most 1 KiB a read.
    async fn read_in_kib(r: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while got.len() < n {
            let k = r.read(&mut chunk).await.unwrap();
            assert!(k > 0, "end of stream after {} of {n} bytes", got.len());
            got.extend_from_slice(&chunk[..k]);
        }
        got
    }

    #[tokio::test]
    async fn a_burst_is_taken_in_few_reads_in_order_and_the_buffer_goes_when_the_socket_is_drained()
    {
        let (mut client, server) = pair().await;
        let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        // All of it in the socket before the first read, so the count below is not a race.
        let mut peeked = vec![0u8; sent.len()];
        while server.peek(&mut peeked).await.unwrap() < sent.len() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut r = ReadAhead::new(Counted {
            inner: server,
            reads: 0,
        });
        let got = read_in_kib(&mut r, sent.len()).await;
        assert_eq!(got, sent, "the same bytes in the same order");
        assert!(
            r.inner.reads <= 8,
            "64 KiB read 1 KiB at a time took {} reads of the socket",
            r.inner.reads
        );
        assert!(r.is_reading_ahead(), "nothing has waited yet");
        // The socket is drained: the read waits, and the buffer is given back.
        let mut one = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(50), r.read(&mut one)).await;
        assert!(waited.is_err(), "a read of a drained socket waits");
        assert!(!r.is_reading_ahead(), "the buffer went with the wait");
        // A short message passes through; no buffer is taken for it.
        client.write_all(b"hello").await.unwrap();
        let mut chunk = [0u8; 1024];
        let k = r.read(&mut chunk).await.unwrap();
        assert_eq!(&chunk[..k], b"hello");
        assert!(!r.is_reading_ahead());
        // The end of the stream reads as the end, after what was sent before it.
        client.write_all(&sent[..3000]).await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_in_kib(&mut r, 3000).await, sent[..3000]);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut client, server) = pair().await;
        let mut w = ReadAhead::new(server);
        w.write_all(b"to the client").await.unwrap();
        w.flush().await.unwrap();
        let mut got = [0u8; 13];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to the client");
    }
}
