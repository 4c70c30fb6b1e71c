//! The last id of each channel as this process committed it, for readers
//! that only need to know whether anything is newer than their cursor (a long
//! poll or a reconnecting stream at the head, which is most of them): they
//! skip the store read.
//!
//! Safe to trust because it only moves forward and the store advances it
//! *before* handing a commit to the sink: a reader that registered with the
//! hub and then finds its cursor at the cached head will get every later
//! message live.

use std::{collections::HashMap, sync::RwLock};

use herald_core::{Channel, Message};

#[derive(Default)]
pub(crate) struct HeadCache {
    heads: RwLock<HashMap<Channel, u64>>,
}

impl HeadCache {
    pub(crate) fn get(&self, channel: &Channel) -> Option<u64> {
        self.heads.read().unwrap_or_else(|e| e.into_inner()).get(channel).copied()
    }

    /// Records that `channel` reached `head` (kept if already further).
    pub(crate) fn advance(&self, channel: &Channel, head: u64) {
        if self.get(channel).is_some_and(|h| h >= head) {
            return;
        }
        let mut heads = self.heads.write().unwrap_or_else(|e| e.into_inner());
        let h = heads.entry(channel.clone()).or_insert(head);
        *h = (*h).max(head);
    }

    /// Records a commit (messages in id order per channel).
    pub(crate) fn committed(&self, msgs: &[std::sync::Arc<Message>]) {
        let mut heads = self.heads.write().unwrap_or_else(|e| e.into_inner());
        for m in msgs {
            let h = heads.entry(m.channel.clone()).or_insert(m.id);
            *h = (*h).max(m.id);
        }
    }
}
