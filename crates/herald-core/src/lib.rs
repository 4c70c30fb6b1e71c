//! Herald's pure core: the vocabulary every other crate speaks.
//!
//! Nothing in here touches a socket, a file or the clock: channels and filters,
//! messages and their shared encodings, cursors and the gap decision, history
//! retention rules, and the hub that fans committed messages out to subscribers'
//! mailboxes. Callers pass in "now" where time matters.

pub mod acl;
pub mod channel;
pub mod cursor;
pub mod filter;
pub mod hub;
pub mod inbox;
pub mod message;
pub mod meta;
pub mod queue;
pub mod retention;
pub mod time;
pub mod vec_map;

pub use acl::{Grant, Principal};
pub use channel::{Channel, ChannelError};
pub use cursor::{CursorError, CursorToken, Gap, Replay, Since, Window};
pub use filter::{Filter, FilterError};
pub use hub::{Hub, Subscriber, Target};
pub use message::{Data, DataKind, EventName, EventNameError, Message, NewMessage, Wire};
pub use meta::Meta;
pub use queue::Queue;
pub use retention::{Retention, RetentionRules};
pub use vec_map::VecMap;
