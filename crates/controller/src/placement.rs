//! Where a replica goes: `tensor × pipeline` GPUs on one node, chosen by bin-packing on
//! what is already placed there. Pure: GPU objects and placed demand in, GPU names out.
//!
//! Models sleep, so a GPU may hold more placed models than fit awake at once: that is the
//! point of GreenThread. Placement still prefers GPUs where the model fits with everything
//! else awake (best fit: the tightest such GPUs, keeping large holes for large models),
//! then the least over-committed GPUs, and avoids stacking two replicas of one model on a
//! GPU, where they could only take turns.

use std::collections::{BTreeMap, BTreeSet};

use greenthread_api::{Gpu, ValidModel};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("no GPU objects yet (is the agent running on the GPU nodes?)")]
    NoGpus,
    #[error(
        "no node has {gpus} GPUs with room for {need_gib:.1} GiB each (tensor × pipeline parallelism {gpus}); nodes seen: {nodes}"
    )]
    NoNodeFits {
        gpus: u32,
        need_gib: f64,
        nodes: String,
    },
}

impl PlacementError {
    /// A condition reason for the Model's status.
    pub fn reason(&self) -> &'static str {
        match self {
            PlacementError::NoGpus => "WaitingForGPUs",
            PlacementError::NoNodeFits { .. } => "Unschedulable",
        }
    }
}

/// What placing needs to know besides the GPUs.
pub struct Request<'a> {
    /// GPUs per replica (`tensor × pipeline`), all on one node.
    pub gpus: u32,
    /// Only GPUs of this product ([`greenthread_api::product_label`] of their product
    /// name); `None`: any. On Kubernetes the node selector decides instead (GPU feature
    /// discovery's label), so the controller leaves it out.
    pub product: Option<&'a str>,
    /// Bytes the model needs on a GPU when serving (measured, or the spec's share of it).
    pub need: &'a dyn Fn(&Gpu) -> u64,
    /// Bytes already placed on each GPU (by name), all models, this one's other replicas too.
    pub placed: &'a BTreeMap<String, u64>,
    /// GPUs holding another replica of this model.
    pub same_model: &'a BTreeSet<String>,
    /// Nodes the Model's `nodeSelector` allows (`None`: any).
    pub nodes: Option<&'a BTreeSet<String>>,
}

/// The GPUs for one replica, all on one node, in index order.
pub fn place(gpus: &[Gpu], req: &Request) -> Result<Vec<String>, PlacementError> {
    if gpus.is_empty() {
        return Err(PlacementError::NoGpus);
    }
    let tp = req.gpus.max(1) as usize;
    let mut by_node: BTreeMap<&str, Vec<&Gpu>> = BTreeMap::new();
    for g in gpus {
        if req.nodes.is_none_or(|n| n.contains(&g.spec.node))
            && req
                .product
                .is_none_or(|p| greenthread_api::product_label(&g.spec.product) == p)
        {
            by_node.entry(&g.spec.node).or_default().push(g);
        }
    }
    // (tier, leftover-or-overcommit, node, gpus): the smallest wins.
    let mut best: Option<(u8, i128, String, Vec<String>)> = None;
    for (node, node_gpus) in &by_node {
        // A GPU too small for the model even alone is no candidate.
        let mut scored: Vec<(u8, i128, &Gpu)> = node_gpus
            .iter()
            .filter(|g| (req.need)(g) <= g.spec.memory_bytes)
            .map(|g| {
                let free = g.spec.memory_bytes as i128
                    - *req.placed.get(&g.name).unwrap_or(&0) as i128
                    - (req.need)(g) as i128;
                let tier = match (free >= 0, req.same_model.contains(&g.name)) {
                    (true, false) => 0,
                    (false, false) => 1,
                    (_, true) => 2,
                };
                // Fitting: the tightest first. Over-committed: the least over first.
                let key = if free >= 0 { free } else { -free };
                (tier, key, *g)
            })
            .collect();
        if scored.len() < tp {
            continue;
        }
        scored.sort_by(|a, b| (a.0, a.1, &a.2.name).cmp(&(b.0, b.1, &b.2.name)));
        let chosen = &scored[..tp];
        let tier = chosen.iter().map(|c| c.0).max().unwrap_or(0);
        let key: i128 = chosen.iter().map(|c| c.1).sum();
        let mut names: Vec<(u32, String)> = chosen
            .iter()
            .map(|c| (c.2.spec.index, c.2.name.clone()))
            .collect();
        names.sort();
        let candidate = (
            tier,
            key,
            node.to_string(),
            names.into_iter().map(|(_, n)| n).collect(),
        );
        if best.as_ref().is_none_or(|b| candidate < *b) {
            best = Some(candidate);
        }
    }
    match best {
        Some((_, _, _, names)) => Ok(names),
        None => {
            let need_gib = gpus.iter().map(|g| (req.need)(g)).min().unwrap_or_default() as f64
                / (1u64 << 30) as f64;
            let nodes = by_node
                .iter()
                .map(|(n, g)| format!("{n} ({} GPUs)", g.len()))
                .collect::<Vec<_>>()
                .join(", ");
            Err(PlacementError::NoNodeFits {
                gpus: tp as u32,
                need_gib,
                nodes: if nodes.is_empty() {
                    match req.product {
                        Some(p) => format!("none with GPUs of product {p}"),
                        None => "none matching nodeSelector".into(),
                    }
                } else {
                    nodes
                },
            })
        }
    }
}

/// Positions in `gpus` for every replica of every model (in the given order), each chosen
/// by [`place`]: best fit where the model fits with everything else awake, else the least
/// over-committed GPUs, replicas of one model apart. The biggest models are placed first
/// (the given order among equals), as they have the fewest good places. `local` and the
/// fleet simulator place this way; a model that cannot be placed comes back by name.
#[allow(clippy::type_complexity)]
pub fn place_models(
    models: &[(String, ValidModel)],
    gpus: &[Gpu],
) -> Result<Vec<Vec<Vec<u32>>>, (String, PlacementError)> {
    place_models_beside(models, gpus, BTreeMap::new())
}

/// [`place_models`] on GPUs that hold `placed` already (bytes by GPU record name): a
/// model added to a running `local` goes where it packs best beside the others.
#[allow(clippy::type_complexity)]
pub fn place_models_beside(
    models: &[(String, ValidModel)],
    gpus: &[Gpu],
    mut placed: BTreeMap<String, u64>,
) -> Result<Vec<Vec<Vec<u32>>>, (String, PlacementError)> {
    let mut order: Vec<usize> = (0..models.len()).collect();
    order.sort_by(|a, b| {
        models[*b]
            .1
            .gpu_memory_utilization
            .total_cmp(&models[*a].1.gpu_memory_utilization)
            .then(a.cmp(b))
    });
    let index: BTreeMap<&str, u32> = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.as_str(), i as u32))
        .collect();
    let mut out: Vec<Vec<Vec<u32>>> = models.iter().map(|_| Vec::new()).collect();
    for i in order {
        let (name, m) = &models[i];
        let need = |g: &Gpu| m.share_of(g.spec.memory_bytes);
        let mut same_model = BTreeSet::new();
        for _ in 0..m.spec.replicas {
            let chosen = place(
                gpus,
                &Request {
                    gpus: m.spec.gpus_per_replica(),
                    product: m.spec.gpu_product(),
                    need: &need,
                    placed: &placed,
                    same_model: &same_model,
                    nodes: None,
                },
            )
            .map_err(|e| (name.clone(), e))?;
            for g in &chosen {
                let gpu = &gpus[index[g.as_str()] as usize];
                *placed.entry(g.clone()).or_default() += need(gpu);
                same_model.insert(g.clone());
            }
            out[i].push(chosen.iter().map(|g| index[g.as_str()]).collect());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use greenthread_api::{GpuSpec, GpuStatus};

    use super::*;

    const GI: u64 = 1 << 30;

    fn gpu(node: &str, index: u32, mem_gi: u64) -> Gpu {
        Gpu {
            name: format!("{node}-{index}"),
            spec: GpuSpec {
                node: node.into(),
                index,
                uuid: format!("GPU-{node}-{index}"),
                product: "H100".into(),
                memory_bytes: mem_gi * GI,
                host_memory_bytes: None,
            },
            status: GpuStatus::default(),
            resource_version: "1".into(),
        }
    }

    fn place_with(
        gpus: &[Gpu],
        tp: u32,
        need_gi: u64,
        placed: &[(&str, u64)],
        same: &[&str],
    ) -> Result<Vec<String>, PlacementError> {
        let placed: BTreeMap<String, u64> = placed
            .iter()
            .map(|(n, b)| (n.to_string(), b * GI))
            .collect();
        let same: BTreeSet<String> = same.iter().map(|s| s.to_string()).collect();
        place(
            gpus,
            &Request {
                gpus: tp,
                product: None,
                need: &|_| need_gi * GI,
                placed: &placed,
                same_model: &same,
                nodes: None,
            },
        )
    }

    #[test]
    fn best_fit_takes_the_tightest_gpu_that_still_fits() {
        let gpus = [gpu("a", 0, 80), gpu("a", 1, 80), gpu("b", 0, 80)];
        // a-0 has 50 placed (30 free), a-1 has 70 (10 free), b-0 empty (80 free).
        let placed = [("a-0", 50), ("a-1", 70)];
        assert_eq!(place_with(&gpus, 1, 20, &placed, &[]).unwrap(), ["a-0"]);
        assert_eq!(place_with(&gpus, 1, 5, &placed, &[]).unwrap(), ["a-1"]);
        assert_eq!(place_with(&gpus, 1, 40, &placed, &[]).unwrap(), ["b-0"]);
    }

    #[test]
    fn when_nothing_fits_awake_the_least_overcommitted_gpu_is_shared() {
        let gpus = [gpu("a", 0, 80), gpu("a", 1, 80)];
        let placed = [("a-0", 75), ("a-1", 60)];
        assert_eq!(place_with(&gpus, 1, 40, &placed, &[]).unwrap(), ["a-1"]);
    }

    #[test]
    fn tensor_parallel_replicas_stay_on_one_node() {
        let gpus = [
            gpu("a", 0, 80),
            gpu("b", 0, 80),
            gpu("b", 1, 80),
            gpu("b", 2, 80),
        ];
        // Node a has one GPU: never half a replica there. On b, best fit takes b-1 first.
        let got = place_with(&gpus, 2, 30, &[("b-1", 30)], &[]).unwrap();
        assert_eq!(got, ["b-0", "b-1"]);
        let err = place_with(&gpus, 4, 30, &[], &[]).unwrap_err();
        assert_eq!(err.reason(), "Unschedulable");
        assert!(err.to_string().contains("no node has 4 GPUs"), "{err}");
    }

    #[test]
    fn a_gpu_too_small_for_the_model_alone_is_never_chosen() {
        let gpus = [gpu("a", 0, 24), gpu("a", 1, 80)];
        assert_eq!(place_with(&gpus, 1, 30, &[], &[]).unwrap(), ["a-1"]);
        let small = [gpu("a", 0, 24)];
        assert!(matches!(
            place_with(&small, 1, 30, &[], &[]),
            Err(PlacementError::NoNodeFits { .. })
        ));
    }

    #[test]
    fn replicas_of_one_model_spread_before_they_stack() {
        let gpus = [gpu("a", 0, 80), gpu("a", 1, 80)];
        // a-0 is the tighter fit, but it holds this model's other replica.
        let got = place_with(&gpus, 1, 20, &[("a-0", 20)], &["a-0"]).unwrap();
        assert_eq!(got, ["a-1"]);
    }

    #[test]
    fn no_gpus_and_node_selectors() {
        assert_eq!(
            place_with(&[], 1, 1, &[], &[]).unwrap_err(),
            PlacementError::NoGpus
        );
        let gpus = [gpu("a", 0, 80), gpu("b", 0, 80)];
        let only_b = BTreeSet::from(["b".to_string()]);
        let got = place(
            &gpus,
            &Request {
                gpus: 1,
                product: None,
                need: &|_| GI,
                placed: &BTreeMap::new(),
                same_model: &BTreeSet::new(),
                nodes: Some(&only_b),
            },
        )
        .unwrap();
        assert_eq!(got, ["b-0"]);
    }
}
