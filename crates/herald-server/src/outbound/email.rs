//! E-mail over SMTP (lettre, rustls): one attempt to hand one mail to the
//! relay, and what the relay's answer means. 4xx is a transient refusal
//! (try again), 5xx a permanent one (a dead letter at once); a connection
//! that cannot be made or breaks is tried again too.
//!
//! Every mail carries `Message-ID: <{delivery id}@{sender's domain}>`, the
//! same on every attempt of one delivery, so a mail sent twice (a crash
//! between the relay's acceptance and the job's completion) can be told
//! from a second mail.

use std::time::Duration;

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::AsyncSmtpTransportBuilder,
};

use super::{Attempt, templates::Template};
use crate::config::SmtpConfig;

pub(crate) struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    subject: Template,
    body: Template,
    timeout: Duration,
}

/// The parts of a mailer that need no runtime: the sender, the templates
/// and the relay's transport builder (`None` without a URL).
type Parts = (Mailbox, Template, Template, Option<AsyncSmtpTransportBuilder>);

fn parts(config: &SmtpConfig) -> Result<Parts, String> {
    let from: Mailbox = config.from.parse().map_err(|e| format!("[smtp] from '{}': {e}", config.from))?;
    let subject = Template::parse(&config.subject).map_err(|e| format!("[smtp] subject: {e}"))?;
    let body = Template::parse(&config.body).map_err(|e| format!("[smtp] body: {e}"))?;
    let transport = if config.url.is_empty() {
        None
    } else {
        // The URL may carry a password: never echo it.
        let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&config.url)
            .map_err(|e| format!("[smtp] url is not an SMTP URL (smtp://host:port, smtps://...): {e}"))?;
        Some(builder.timeout(Some(config.timeout)))
    };
    Ok((from, subject, body, transport))
}

/// Checks the `[smtp]` settings as they will be used: the URL, the sender
/// and the templates.
pub(crate) fn check_config(config: &SmtpConfig) -> Result<(), String> {
    parts(config).map(drop)
}

impl Mailer {
    /// The mailer, or `None` when no SMTP URL is configured. Its connection
    /// pool lives on the current runtime.
    pub(crate) fn new(config: &SmtpConfig) -> Result<Option<Self>, String> {
        let (from, subject, body, transport) = parts(config)?;
        Ok(transport.map(|t| Mailer { transport: t.build(), from, subject, body, timeout: config.timeout }))
    }

    /// The subject and body for a digest's template context.
    pub(crate) fn render(&self, context: &serde_json::Value) -> (String, String) {
        // A subject is one line, whatever the notification titles hold.
        let subject = self.subject.render(context).split(['\r', '\n']).collect::<Vec<_>>().join(" ");
        (subject, self.body.render(context))
    }

    /// Hands one mail to the relay.
    pub(crate) async fn send(&self, to: &str, subject: String, body: String, message_id: String) -> Attempt {
        let to: Mailbox = match to.parse() {
            Ok(m) => m,
            Err(e) => return Attempt::Never(format!("the address is not valid: {e}")),
        };
        let mail = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(message_id))
            .header(ContentType::TEXT_PLAIN)
            .body(body);
        let mail = match mail {
            Ok(m) => m,
            Err(e) => return Attempt::Never(format!("the mail could not be built: {e}")),
        };
        // lettre's own timeout covers each command; this one the whole send.
        match tokio::time::timeout(self.timeout, self.transport.send(mail)).await {
            Ok(Ok(_)) => Attempt::Sent,
            Ok(Err(e)) if e.is_permanent() => Attempt::Never(format!("the relay refused it: {e}")),
            Ok(Err(e)) => Attempt::Again { error: format!("SMTP: {e}"), after: None },
            Err(_) => Attempt::Again { error: "SMTP: timed out".into(), after: None },
        }
    }

    /// The domain of the sender, for Message-IDs.
    pub(crate) fn domain(&self) -> &str {
        self.from.email.domain()
    }
}
