//! Log lines on stderr, as text or JSON, each naming the node that wrote it
//! once the server has one (`[server] node`, else host and port): with
//! several nodes shipping to one place, a line without it says little.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr (`HERALD_LOG` filters them, e.g. `debug` or
/// `herald_server=debug`); stdout carries only the lines that name the
/// listening addresses, which scripts read.
pub(crate) fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A closed stderr must not take the server down: write errors are dropped
    // rather than reported (reporting them panics on a broken pipe).
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    match format {
        LogFormat::Text => {
            let text = tracing_subscriber::fmt::format();
            builder.event_format(WithNode { inner: text, json: false }).init()
        }
        // One object a line: {"node","timestamp","level","target","message",..fields}.
        LogFormat::Json => {
            let json = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            builder
                .event_format(WithNode { inner: json, json: true })
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .init()
        }
    }
}

/// Puts `node` first in each line: `node=NAME ` before a text line, a
/// `"node"` member first in a JSON object.
struct WithNode<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithNode<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let Some(node) = herald_server::server::NODE.get() else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "node={node} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        // The JSON formatter writes a whole object; its opening brace is
        // where the member goes. (A buffer per line: logging is not a hot path.)
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                let name = serde_json::to_string(node).map_err(|_| fmt::Error)?;
                write!(writer, "{{\"node\":{name},{rest}")
            }
            None => writer.write_str(&line),
        }
    }
}
