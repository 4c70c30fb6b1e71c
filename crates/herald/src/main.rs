//! The `herald` binary: parses the command line and hands over to the server
//! or to one of the small client commands.

mod bench;
mod logging;
mod malloc;
mod publish;
mod subscribe;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use herald_server::{Config, Overrides, Server};
use logging::LogFormat;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "One self-hosted binary for real-time push: polling, long polling, iframe, SSE, WebSocket and MQTT over the same channels."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as JSON (one object a line, for log shippers).
    #[arg(long, global = true, value_enum, env = "HERALD_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Configuration file (default: ./herald.toml when it exists).
        #[arg(long, env = "HERALD_CONFIG")]
        config: Option<PathBuf>,
        /// HTTP listen address, e.g. 127.0.0.1:8080 (port 0 picks a free port).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// MQTT listen address, e.g. 127.0.0.1:1883 ("off" turns it off).
        #[arg(long)]
        mqtt: Option<String>,
        /// Data directory of the embedded store.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Keep everything in memory (nothing survives a restart).
        #[arg(long)]
        memory: bool,
        /// Serve without authentication on a non-loopback address.
        #[arg(long)]
        allow_open: bool,
    },
    /// Load generator against a server on loopback (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Mint a user token (JWT, HS256) with the configured [auth] jwt_secret.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// Channel patterns the token may subscribe to (comma-separated).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Channel patterns the token may publish to (comma-separated).
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, env = "HERALD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Publish one message and print its id.
    Publish {
        channel: String,
        /// The data; `-` reads standard input. JSON objects and arrays are sent
        /// as JSON, anything else as text, unless --json or --text says otherwise.
        data: String,
        #[arg(long)]
        event: Option<String>,
        #[arg(long, conflicts_with = "text")]
        json: bool,
        #[arg(long)]
        text: bool,
        /// Server URL.
        #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// An API key or a user token (JWT), sent as `Authorization: Bearer`;
        /// needed once the server has auth configured.
        #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Follow a channel over SSE, printing one JSON line per message; resumes
    /// by itself from the last id when the connection drops or the server restarts.
    Subscribe {
        channel: String,
        /// Start after this id (`0` = all retained history, `now` = live only).
        #[arg(long, default_value = "0")]
        since: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// An API key or a user token (JWT), sent as `Authorization: Bearer`.
        #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. }) {
        malloc::one_arena();
    }
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config, http, mqtt, data, memory, allow_open } => {
                serve(config, Overrides { http, mqtt, data, memory, allow_open }).await
            }
            Command::Token { sub, channels, publish, ttl, config } => token(config, &sub, &channels, &publish, &ttl),
            Command::Bench(b) => bench::run(b).await,
            Command::Publish { channel, data, event, json, text, server, token } => {
                let kind = publish::Kind::from_flags(json, text);
                publish::run(&server, token.as_deref(), &channel, &data, event.as_deref(), kind).await
            }
            Command::Subscribe { channel, since, count, server, token } => {
                subscribe::run(&server, token.as_deref(), &channel, &since, count).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_file: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let config = Config::load(config_file.as_deref(), &overrides)?;
    let shutdown = CancellationToken::new();
    let storage = if config.server.memory {
        "in memory (nothing survives a restart)".to_string()
    } else {
        format!("in {}", config.server.data.display())
    };
    let server = Server::bind(config, shutdown.clone()).await?;
    // Scripts and tests read these lines to learn the ports. A closed stdout
    // (`herald serve | head -1`) is not an error worth stopping for.
    let mqtt = server.mqtt_addr().map_or("herald mqtt off".to_string(), |a| format!("herald mqtt listening on {a}"));
    let mut lines = format!("herald listening on http://{}\n{mqtt}", server.http_addr());
    if let Some(a) = server.metrics_addr() {
        lines.push_str(&format!("\nherald metrics listening on http://{a}/metrics"));
    }
    announce(&lines);
    if server.is_open() {
        tracing::warn!(
            "OPEN MODE: no [auth] configured, so anyone who can reach {} may publish, subscribe and read every \
             inbox. Fine for development; configure jwt_secret / api_keys before real use. Dev tokens: GET /api/dev/token?sub=USER",
            server.http_addr()
        );
    }
    tracing::info!(addr = %server.http_addr(), "serving; messages kept {storage}");
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
        tracing::info!("shutting down: closing streams and finishing writes");
    });
    server.run().await?;
    Ok(())
}

fn announce(lines: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{lines}");
    let _ = out.flush();
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn token(config: Option<PathBuf>, sub: &str, channels: &[String], publish: &[String], ttl: &str) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref(), &Overrides::default())?;
    if config.auth.jwt_secret.is_empty() {
        anyhow::bail!(
            "no [auth] jwt_secret is configured (herald.toml or HERALD_AUTH_JWT_SECRET); \
             a server in open mode hands out dev tokens at GET /api/dev/token?sub=USER"
        );
    }
    let ttl = herald_server::config::parse_duration(ttl).map_err(anyhow::Error::msg)?;
    let stamp = herald_server::auth::Stamp::of(&config.auth);
    let token = herald_server::auth::mint_with(config.auth.jwt_secret.as_bytes(), sub, channels, publish, ttl, stamp)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    println!("{token}");
    Ok(())
}
