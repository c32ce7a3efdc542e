//! `lb-agent`: the node agent (`run`) and the operator's commands (`lb_userspace::cli`).

use anyhow::Result;
use clap::Parser;
use lb_control::model::Proto;
use lb_userspace::{
    agent,
    cli::{
        self,
        args::{Cli, Command, Output, TraceProto},
    },
};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // One TLS crypto provider for the Kubernetes client (kube's rustls feature leaves the choice).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Run(a) => {
            let cfg = a.into_config()?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::Flows {
            service,
            summary,
            output,
            duration,
            pin_path,
            metrics_addr,
        } => {
            let duration = duration
                .or(summary.then_some(10.0))
                .map(std::time::Duration::from_secs_f64);
            let opts = cli::flows::Options {
                pin: &pin_path,
                metrics: metrics_addr,
                filter: service.as_deref(),
                summary,
                json: matches!(output, Output::Json),
                duration,
            };
            cli::flows::run(&opts, &mut std::io::stdout().lock())
        }
        Command::Uninstall { pin_path } => cli::uninstall::run(&pin_path),
        Command::Status {
            pin_path,
            healthz_addr,
            metrics_addr,
        } => {
            let (report, attention) = cli::status::status(&pin_path, healthz_addr, metrics_addr)?;
            print!("{report}");
            if attention {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Trace {
            proto,
            src,
            dst,
            iface,
            pin_path,
        } => {
            let proto = match proto {
                TraceProto::Tcp => Proto::Tcp,
                TraceProto::Udp => Proto::Udp,
            };
            print!(
                "{}",
                cli::trace::trace(&pin_path, proto, src, dst, iface.as_deref())?
            );
            Ok(())
        }
        Command::Services {
            output,
            pin_path,
            stats,
        } => cli::services::run(&pin_path, matches!(output, Output::Json), stats),
    }
}
