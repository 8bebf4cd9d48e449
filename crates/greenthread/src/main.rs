use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "greenthread", version, about = "Many LLMs on few GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sleep/wake proxy in front of one inference engine.
    Sidecar(greenthread_sidecar::SidecarConfig),
    /// A vLLM-compatible simulated engine.
    SimEngine(greenthread_simulator::SimConfig),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.command {
            Command::Sidecar(cfg) => greenthread_sidecar::run(cfg).await,
            Command::SimEngine(cfg) => greenthread_simulator::bind_and_serve(cfg).await,
        }
    })
}
