//! `greenthread download`: a model's weights into the node's cache before its engine
//! first boots (`local` does the same for each model; an init container can run it in a
//! pod), with progress on stdout.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use greenthread_weights::{Cache, Hub, Weights, progress_line, throttled};

#[derive(Debug, Clone, clap::Args)]
pub struct DownloadArgs {
    /// The hub repository, `org/name`.
    pub repo: String,
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The cache, in the hub's layout (default: `HF_HUB_CACHE`, `HF_HOME/hub` or
    /// `~/.cache/huggingface/hub`, where vLLM and SGLang look).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Then evict the least recently used other repositories until the cache holds at
    /// most this much (e.g. `500Gi`).
    #[arg(long, value_parser = greenthread_api::arg::size)]
    pub cache_budget: Option<u64>,
    /// A file holding the hub token, for gated models (also `HF_TOKEN`; never a flag
    /// value, which `ps` shows).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The hub, or a mirror.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub endpoint: String,
}

pub async fn run(args: DownloadArgs) -> anyhow::Result<()> {
    let token = greenthread_edge::secret("HF_TOKEN", args.token_file.as_deref())?;
    let cache = Cache::new(args.cache_dir.clone().unwrap_or_else(Cache::default_root));
    let weights = Weights::new(Hub::new(&args.endpoint, token), cache);
    let repo = args.repo.clone();
    let print = throttled(Duration::from_secs(1), move |p| {
        println!("{}", progress_line(&repo, p))
    });
    let ready = weights
        .ensure(&args.repo, &args.revision, &print)
        .await
        .with_context(|| format!("downloading {}", args.repo))?;
    println!(
        "ready {}@{}: {} ({} bytes downloaded of {})",
        args.repo,
        ready.commit,
        ready.path.display(),
        ready.downloaded,
        ready.total
    );
    if let Some(budget) = args.cache_budget {
        let removed = weights.cache().evict(budget, &[args.repo.as_str()])?;
        for r in removed {
            println!("evicted {r}");
        }
    }
    Ok(())
}
