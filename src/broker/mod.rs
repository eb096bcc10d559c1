//! The broker without a transport: the state the WebSocket connections and the admin API share,
//! and the rules they both apply (today the publish answer). Neither `connection` nor `admin`
//! imports the other, and neither imports the listener (`net`), which only starts them.

mod publish;
pub mod registry;
pub mod session;
mod shared;

pub(crate) use publish::{publish_answer, store_error_message, PublishRefusal};
pub use shared::Shared;
