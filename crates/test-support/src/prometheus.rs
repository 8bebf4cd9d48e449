//! A real Prometheus server (Debian's `prometheus` package) for tests.

use std::{path::Path, time::Duration};

use serde_json::Value;

use crate::{Proc, free_port, http, wait_until};

pub struct Prometheus {
    pub url: String,
    client: reqwest::Client,
    _dir: tempfile_dir::TempDir,
    _proc: Proc,
}

mod tempfile_dir {
    pub struct TempDir(pub std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A query's result: each series' labels and value (NaN where Prometheus says so).
pub type Series = Vec<(serde_json::Map<String, Value>, f64)>;

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping every second with `scrape_configs` (YAML list items,
    /// indented by two spaces), and waits until it answers queries.
    pub async fn start(scrape_configs: &str) -> Self {
        let bin = "/usr/bin/prometheus";
        assert!(
            Path::new(bin).exists(),
            "Debian's prometheus package is needed (scripts/test installs it)"
        );
        let dir =
            std::env::temp_dir().join(format!("gt-prom-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!("global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n{scrape_configs}"),
        )
        .unwrap();
        let port = free_port();
        let proc = Proc::spawn(
            bin,
            &[
                format!("--config.file={}", dir.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ],
        );
        let me = Self {
            url: format!("http://127.0.0.1:{port}"),
            client: http(),
            _dir: tempfile_dir::TempDir(dir),
            _proc: proc,
        };
        wait_until("prometheus to answer", Duration::from_secs(60), || async {
            let r = me
                .client
                .get(format!("{}/-/ready", me.url))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        me
    }

    /// Runs an instant query; `Err` carries Prometheus's error (e.g. a parse error).
    pub async fn try_query(&self, q: &str) -> Result<Series, String> {
        let v: Value = self
            .client
            .get(format!("{}/api/v1/query?query={}", self.url, encode(q)))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        let value = r["value"][1]
                            .as_str()
                            .and_then(|s| s.parse::<f64>().ok())
                            .unwrap_or(f64::NAN);
                        (r["metric"].as_object().cloned().unwrap_or_default(), value)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    pub async fn query(&self, q: &str) -> Series {
        self.try_query(q)
            .await
            .unwrap_or_else(|e| panic!("`{q}`: {e}"))
    }

    /// Waits until every target is up.
    pub async fn wait_up(&self, targets: usize) {
        wait_until(
            &format!("{targets} targets up"),
            Duration::from_secs(60),
            || async {
                let r = self.try_query("up == 1").await.ok()?;
                (r.len() >= targets).then_some(())
            },
        )
        .await;
    }
}
