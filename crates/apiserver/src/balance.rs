//! Which replica of a Model a request goes to, and when another one should wake: a pure
//! decision over each replica's state and the requests this server has outstanding on
//! it, so that it is tested from tables.
//!
//! - No replica serves: the request joins a wake under way (a replica `pending` or
//!   `waking`), else starts one on the first replica. One wake at a time per Model: a
//!   cold Model does not wake all its replicas for one request.
//! - Replicas serve: the one with the fewest outstanding requests; ties go round-robin
//!   (`turn`). Past [`FEW`] serving replicas, the better of two chosen by `turn` (power
//!   of two choices: nearly as good, and no scan of every replica per request).
//! - Scale-out: when every serving replica has at least `scale_out` requests outstanding
//!   and no other replica is already waking, the first sleeping one wakes (in the
//!   background: this request still goes to a serving replica). An extra replica that
//!   goes idle sleeps again by its sidecar's idle rules. `scale_out` 0 never wakes one.

/// Up to this many serving replicas are all compared; beyond, two are.
pub const FEW: usize = 4;

/// One replica as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub state: &'static str,
    pub outstanding: usize,
}

/// Where a request goes, and which replica to wake besides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub send: usize,
    pub wake: Option<usize>,
}

fn waking(state: &str) -> bool {
    state == "pending" || state == "waking"
}

/// The decision; `None` when there is no replica. `turn` is a counter the caller
/// advances per request.
pub fn choose(replicas: &[Load], scale_out: usize, turn: u64) -> Option<Pick> {
    let serving: Vec<usize> = (0..replicas.len())
        .filter(|&i| replicas[i].state == "serving")
        .collect();
    if serving.is_empty() {
        let send = replicas.iter().position(|r| waking(r.state)).unwrap_or(0);
        return (!replicas.is_empty()).then_some(Pick { send, wake: None });
    }
    let n = serving.len();
    let load = |k: usize| replicas[serving[k]].outstanding;
    let start = (turn % n as u64) as usize;
    let best = if n <= FEW {
        // The first of the least loaded, counting from `start`.
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&k| load(k))
            .expect("n > 0")
    } else {
        let other = (start + 1 + ((turn / n as u64) % (n as u64 - 1)) as usize) % n;
        if load(other) < load(start) {
            other
        } else {
            start
        }
    };
    let saturated = scale_out > 0 && (0..n).all(|k| load(k) >= scale_out);
    let wake = if saturated && !replicas.iter().any(|r| waking(r.state)) {
        replicas.iter().position(|r| r.state == "sleeping")
    } else {
        None
    };
    Some(Pick {
        send: serving[best],
        wake,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(spec: &str) -> Vec<Load> {
        // "s3 z0 w1": serving with 3 outstanding, sleeping, waking with 1.
        spec.split_whitespace()
            .map(|t| Load {
                state: match &t[..1] {
                    "s" => "serving",
                    "z" => "sleeping",
                    "w" => "waking",
                    "p" => "pending",
                    "b" => "booting",
                    other => panic!("{other}"),
                },
                outstanding: t[1..].parse().unwrap(),
            })
            .collect()
    }

    /// (replicas, scale_out, turn) → (send, wake)
    type Row = (&'static str, usize, u64, Option<(usize, Option<usize>)>);

    #[test]
    fn the_table() {
        let table: &[Row] = &[
            ("", 8, 0, None),
            // Nothing serves: the first replica wakes; a wake under way is joined.
            ("z0 z0", 8, 5, Some((0, None))),
            ("z0 p0 z0", 8, 5, Some((1, None))),
            ("b0 w0", 8, 0, Some((1, None))),
            // The least loaded serving replica.
            ("s3 s1 z0", 8, 0, Some((1, None))),
            ("s0 s2", 8, 1, Some((0, None))),
            ("z0 s5 s4 s6", 8, 0, Some((2, None))),
            // Ties go round-robin.
            ("s1 s1 s1", 8, 0, Some((0, None))),
            ("s1 s1 s1", 8, 1, Some((1, None))),
            ("s1 s1 s1", 8, 2, Some((2, None))),
            ("s1 s1 s1", 8, 3, Some((0, None))),
            // Every serving replica at scale_out: the first sleeping one wakes too.
            ("s2 z0 z0", 2, 0, Some((0, Some(1)))),
            ("s2 s3 z0", 2, 0, Some((0, Some(2)))),
            // One below it: no wake.
            ("s2 s1 z0", 2, 0, Some((1, None))),
            // Already waking one: not a second.
            ("s2 w0 z0", 2, 0, Some((0, None))),
            // Nothing asleep to wake (booting is not asleep).
            ("s9 b0", 2, 0, Some((0, None))),
            // scale_out 0: never.
            ("s99 z0", 0, 0, Some((0, None))),
        ];
        for (spec, scale_out, turn, want) in table {
            let got = choose(&loads(spec), *scale_out, *turn).map(|p| (p.send, p.wake));
            assert_eq!(got, *want, "{spec:?} scale_out {scale_out} turn {turn}");
        }
    }

    #[test]
    fn past_a_few_replicas_the_better_of_two_and_every_replica_gets_its_turn() {
        let mut r = loads("s5 s5 s5 s5 s5 s5 s5 s5");
        r[6].outstanding = 0;
        let mut sent = [0usize; 8];
        for turn in 0..64 {
            let p = choose(&r, 0, turn).unwrap();
            // Never the worse of its two: the idle replica wins whenever it is drawn.
            sent[p.send] += 1;
        }
        assert!(sent.iter().all(|&n| n > 0), "{sent:?}");
        assert!(
            sent[6] > sent[0] * 2,
            "the idle replica is preferred: {sent:?}"
        );
        // Two choices are two distinct replicas.
        for turn in 0..1000 {
            let n = 8u64;
            let start = turn % n;
            let other = (start + 1 + (turn / n) % (n - 1)) % n;
            assert_ne!(start, other);
        }
    }
}
