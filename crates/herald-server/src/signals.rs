//! What the store hands this node besides messages: signals from this node
//! or another (over Redis, every node hears every signal, in order with its
//! partition's messages). Messages go to the hub; a signal goes to whoever
//! keeps state it changes: the inbox (read marks, group membership) and the
//! MQTT broker (retained messages, client ids claimed on another node,
//! messages on topics that are not channels).
//!
//! The store is built before the inbox and the broker (they need it), so
//! they are attached to the sink once they exist; a signal before that has
//! nobody to tell.

use std::sync::{Arc, OnceLock};

use herald_core::{Channel, Filter, Hub, Message};
use herald_store::{CommitSink, Signal};

use crate::{inbox::Inbox, transport::mqtt::Broker};

/// Users' read state or groups changed; `body`: the users, one per line.
pub(crate) const INBOX: u8 = 1;
/// An MQTT client connected on the node named in `body`; `key`: its id.
pub(crate) const MQTT_CLAIM: u8 = 2;
/// An MQTT message on a topic that is not a channel (`body`: encoded).
pub(crate) const MQTT_ROUTED: u8 = 3;
/// An MQTT client's session was released by the node that held it
/// (`key`: its id; `body`: the node that claimed it).
pub(crate) const MQTT_RELEASED: u8 = 4;

/// The store's sink: the hub for messages, the inbox and the broker for
/// signals.
pub struct Sink {
    hub: Arc<Hub>,
    targets: OnceLock<Targets>,
    /// Each commit's time and size are recorded here (`/metrics`).
    metrics: Arc<crate::metrics::Metrics>,
}

struct Targets {
    inbox: Arc<Inbox>,
    mqtt: Arc<Broker>,
}

impl Sink {
    pub fn new(hub: Arc<Hub>, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Sink { hub, targets: OnceLock::new(), metrics })
    }

    /// Attaches what signals are for, once both exist.
    pub(crate) fn attach(&self, inbox: Arc<Inbox>, mqtt: Arc<Broker>) {
        let _ = self.targets.set(Targets { inbox, mqtt });
    }
}

impl CommitSink for Sink {
    fn committed(&self, msgs: &[Arc<Message>]) {
        self.hub.publish(msgs);
    }

    fn commit_took(&self, messages: usize, took: std::time::Duration) {
        self.metrics.commit(messages, took);
    }

    fn interest(&self) -> (Vec<Channel>, Vec<Filter>) {
        self.hub.interest()
    }

    fn signaled(&self, signal: &Signal) {
        let Some(t) = self.targets.get() else { return };
        match signal.kind {
            INBOX => {
                let users: Vec<String> = String::from_utf8_lossy(&signal.body)
                    .split('\n')
                    .filter(|u| !u.is_empty())
                    .map(String::from)
                    .collect();
                let inbox = t.inbox.clone();
                tokio::spawn(async move {
                    if let Err(e) = inbox.refresh(&users).await {
                        tracing::warn!(error = %e, "could not refresh unread counts after a change on another node");
                    }
                });
            }
            Signal::RECORD => t.mqtt.record_changed(&signal.key, &signal.body, signal.seq),
            MQTT_CLAIM | MQTT_RELEASED | MQTT_ROUTED => t.mqtt.signaled(signal),
            Signal::RESYNC => {
                let inbox = t.inbox.clone();
                tokio::spawn(async move {
                    if let Err(e) = inbox.refresh_all().await {
                        tracing::warn!(error = %e, "could not refresh unread counts after a feed resync");
                    }
                });
                t.mqtt.resync();
            }
            _ => {}
        }
    }
}
