//! The whole request path in one process with no socket, on tokio's paused clock: a
//! client reaches a real sidecar's public router, which reaches the real simulated
//! engine's router, each through the same HTTP edge as in production but over in-memory
//! pipes. This is what the fleet simulator runs: virtual seconds pass (a boot, a wake),
//! wall time does not.

use std::{sync::Arc, time::Duration};

use axum::{body::Bytes, http};
use greenthread_api::GpuSpec;
use greenthread_edge::{Connector, EdgeConfig, Shutdown, transport::memory};
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{
    AppState, Clock, Forwarder, GpuRef, Parts, Sidecar, SidecarConfig, adapter_over,
    engine_forwarder, public_router, state::State,
};
use greenthread_simulator::{SimConfig, SimEngine, router};
use tokio::time::Instant;

const GI: u64 = 1 << 30;
/// Only a name here: no socket is ever opened for it.
const ENGINE_URL: &str = "http://engine.in-memory:8001";

fn chat(model: &str) -> (http::request::Parts, Bytes) {
    chat_with(format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}"#
    ))
}

/// A chat completion request with `body`.
fn chat_with(body: impl Into<Bytes>) -> (http::request::Parts, Bytes) {
    let (parts, ()) = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    (parts, body.into())
}

async fn send(client: &Forwarder, model: &str) -> (u16, String) {
    let (parts, body) = chat(model);
    let resp = client
        .forward(&parts, body, ())
        .await
        .expect("reaches the sidecar");
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A booted simulated engine served over an in-memory pipe, and a sidecar in front of
/// it (not started) on an in-memory ledger with one 80 GiB GPU.
struct Rig {
    engine: Arc<SimEngine>,
    pipe: Connector,
    ledger: Arc<MemoryLedger>,
    sidecar: Arc<Sidecar>,
    cfg: SidecarConfig,
}

async fn rig(sim: SimConfig, sidecar_args: &[&str], stop: &Shutdown) -> Rig {
    let engine = SimEngine::new(sim);
    engine.boot().await.unwrap();
    let (engine_addr, engine_listener) = memory("engine");
    tokio::spawn(greenthread_edge::serve(
        engine_listener,
        router(engine.clone()),
        EdgeConfig::default(),
        stop.clone(),
    ));
    let ledger = Arc::new(MemoryLedger::new());
    ledger.add_gpu(
        "g-0",
        GpuSpec {
            node: "n".into(),
            index: 0,
            memory_bytes: 80 * GI,
            ..Default::default()
        },
    );
    let mut args = vec!["--engine-url", ENGINE_URL, "--memory-bytes", "10737418240"];
    args.extend_from_slice(sidecar_args);
    let cfg = SidecarConfig::from_args("m", &args).unwrap();
    let pipe = Connector::Memory(engine_addr);
    let (adapter, probe) =
        adapter_over(&cfg, ENGINE_URL, Some(pipe.clone()), None, &[0], None).unwrap();
    let sidecar = Sidecar::new(
        cfg.clone(),
        Parts {
            engine: adapter,
            process: None,
            ledger: ledger.clone() as Arc<dyn Ledger>,
            gpus: vec![GpuRef {
                name: "g-0".into(),
                index: 0,
            }],
            probe,
            clock: Clock::tokio(),
        },
    );
    Rig {
        engine,
        pipe,
        ledger,
        sidecar,
        cfg,
    }
}

/// Serves `sidecar`'s public router (its engine over `pipe`) on an in-memory pipe, and
/// returns a client of it, as the API server is of a replica in a pod.
fn serve_sidecar(
    sidecar: &Arc<Sidecar>,
    cfg: &SidecarConfig,
    pipe: Connector,
    stop: &Shutdown,
) -> Forwarder {
    let (addr, listener) = memory("sidecar");
    tokio::spawn(greenthread_edge::serve(
        listener,
        public_router(AppState {
            sidecar: sidecar.clone(),
            forwarder: Arc::new(
                engine_forwarder(cfg, ENGINE_URL)
                    .unwrap()
                    .with_connector(pipe),
            ),
        }),
        EdgeConfig::default(),
        stop.clone(),
    ));
    Forwarder::new("http://sidecar.in-memory:8080")
        .unwrap()
        .with_connector(Connector::Memory(addr))
}

#[tokio::test(start_paused = true)]
async fn a_request_wakes_a_simulated_engine_through_in_memory_pipes() {
    let start = Instant::now();
    let stop = Shutdown::new();

    // The engine: 8 GiB of weights that come back from host memory at 4 GiB/s.
    let mut sim = SimConfig::for_model("m");
    sim.weights_bytes = 8 * GI;
    sim.h2d_bandwidth = 4 * GI;
    sim.boot_time = Duration::from_secs(20);
    let Rig {
        engine,
        pipe,
        sidecar,
        cfg,
        ..
    } = rig(sim, &["--idle-timeout", "1h"], &stop).await;
    let client = serve_sidecar(&sidecar, &cfg, pipe, &stop);
    sidecar.start().await.unwrap().unwrap();

    let (status, body) = send(&client, "m").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    assert_eq!(sidecar.state(), State::Serving);

    // Asleep through the pipe, then woken by the next request: the wake copies 8 GiB at
    // 4 GiB/s, two virtual seconds.
    sidecar.deactivate("test").await.unwrap();
    assert!(engine.is_sleeping());
    let asleep_at = Instant::now();
    let (status, body) = send(&client, "m").await;
    assert_eq!(status, 200, "{body}");
    assert!(!engine.is_sleeping());
    let waited = asleep_at.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "the wake took {waited:?} of virtual time"
    );

    stop.trigger();
    sidecar.shutdown().await;
    assert_eq!(sidecar.tasks_running(), 0);
    // Virtual time covered the 20 s boot and the 2 s wake.
    assert!(
        start.elapsed() >= Duration::from_secs(22),
        "{:?}",
        start.elapsed()
    );
}

/// An engine that comes back awake on its own while its model sleeps (its container
/// restarted) holds memory nothing charges: the sidecar notices on a heartbeat, puts it
/// back to sleep and stays asleep itself.
#[tokio::test(start_paused = true)]
async fn an_engine_awake_behind_a_sleeping_sidecar_is_put_back_to_sleep() {
    let stop = Shutdown::new();
    let mut sim = SimConfig::for_model("m");
    sim.weights_bytes = 8 * GI;
    let Rig {
        engine,
        ledger,
        sidecar,
        ..
    } = rig(sim, &["--wake-lock-ttl", "30s"], &stop).await;
    sidecar.start().await.unwrap().unwrap();
    assert!(engine.is_sleeping(), "booted asleep");

    // Behind the sidecar's back, as a restarted container comes up.
    engine.wake(&[]).await.unwrap();
    assert!(!engine.is_sleeping());
    let woke = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !engine.is_sleeping() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("put back to sleep");
    // Within a heartbeat (a third of the lock's lifetime) and the sleep itself.
    assert!(
        woke.elapsed() <= Duration::from_secs(11),
        "{:?}",
        woke.elapsed()
    );
    assert_eq!(sidecar.state(), State::Sleeping);
    let record = ledger.get("g-0").await.unwrap();
    let entry = record.status.occupant(&sidecar.pod).unwrap();
    assert_eq!(
        entry.reserved_memory_bytes, 0,
        "nothing is charged while asleep"
    );

    stop.trigger();
    sidecar.shutdown().await;
}

/// A stream whose client goes away ends in the engine at once, as vLLM aborts the
/// requests of disconnected clients: a resumed preemption relies on it (the engine's
/// sleep waits for its running requests).
#[tokio::test(start_paused = true)]
async fn a_stream_whose_client_goes_away_stops_running_in_the_engine() {
    let stop = Shutdown::new();
    let mut sim = SimConfig::for_model("m");
    sim.tokens_per_second = 40.0;
    sim.coalesce_stream = true;
    // The engine alone: its sidecar is not started.
    let Rig { engine, pipe, .. } = rig(sim, &[], &stop).await;
    let client = Forwarder::new(ENGINE_URL).unwrap().with_connector(pipe);
    let (parts, body) = chat_with(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1000,"stream":true}"#,
    );
    let resp = client.forward(&parts, body, ()).await.unwrap();
    let mut b = resp.into_body().into_data_stream();
    use futures_util::StreamExt;
    let _ = b.next().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(engine.running(), 1);
    drop(b);
    tokio::time::timeout(Duration::from_secs(1), async {
        while engine.running() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the sequence slot is freed well before the 25 s the answer would take");
}

/// The race 2f76342 closed, staged: under `preemption: resume`, a streamed request
/// admitted by its model's wake is stopped by a preemption that comes between its
/// admission and its own first step (it then marks the stop signal seen before it ever
/// waits on it). It must stop there and go on after the next wake, not hold the victim
/// for the whole answer.
#[tokio::test(start_paused = true)]
async fn an_answer_admitted_as_its_model_is_preempted_stops_instead_of_draining() {
    let stop = Shutdown::new();
    let mut sim = SimConfig::for_model("m");
    sim.weights_bytes = 8 * GI;
    // 20 tokens at one a second: drained whole, the answer holds the victim 20 s.
    sim.tokens_per_second = 1.0;
    let Rig {
        pipe, sidecar, cfg, ..
    } = rig(
        sim,
        &["--idle-timeout", "1h", "--preemption", "resume"],
        &stop,
    )
    .await;
    let client = serve_sidecar(&sidecar, &cfg, pipe, &stop);
    sidecar.start().await.unwrap().unwrap();
    let mut busy = sidecar.busy_changes();
    busy.borrow_and_update();

    let answer = tokio::spawn(async move {
        let (parts, body) = chat_with(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":20,"stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let resp = client.forward(&parts, body, ()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8_lossy(&body).into_owned()
    });
    // The wake admits the request and says so before the request's own task runs: the
    // preemption comes then, between that admission and the request's first step. (A
    // spawned task, queued in order; the test's own future is polled only between
    // rounds of tasks, after the request's.)
    let victim = sidecar.clone();
    let held = tokio::spawn(async move {
        busy.changed().await.unwrap();
        assert_eq!(victim.state(), State::Serving);
        let named = Instant::now();
        victim.deactivate("preempted").await.unwrap();
        named.elapsed()
    })
    .await
    .unwrap();
    assert!(
        held < Duration::from_secs(5),
        "the victim drained the answer instead of stopping it: asleep after {held:?}"
    );
    // The answer goes on after the next wake, one answer of all 20 tokens.
    let body = answer.await.unwrap();
    assert!(body.contains("\"completion_tokens\":20"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(
        sidecar.metrics.resumed.get(),
        1,
        "stopped once, continued once"
    );

    stop.trigger();
    sidecar.shutdown().await;
}

/// What a preemption would have to wait for reaches the GPU record with the traffic
/// report: `draining` counts the answers in flight that cannot be stopped — every answer
/// under `preemption: drain`; under `resume` those that cannot be continued (here, not
/// streamed), not a streamed first leg, which a preemption stops; a batch's request
/// counts as any other. The cost-aware policy spares such a model until the waker has
/// waited its bound.
#[tokio::test(start_paused = true)]
async fn the_record_counts_the_answers_a_preemption_would_have_to_wait_for() {
    // (preemption, streamed, from a batch) → draining while one answer is in flight
    let cases = [
        ("drain", true, false, 1),
        ("resume", true, false, 0),
        ("resume", false, false, 1),
        ("drain", true, true, 1),
        ("resume", true, true, 0),
    ];
    for (preemption, streamed, batch, draining) in cases {
        let stop = Shutdown::new();
        let mut sim = SimConfig::for_model("m");
        sim.weights_bytes = 8 * GI;
        // 20 tokens at one a second: in flight for 20 s.
        sim.tokens_per_second = 1.0;
        let Rig {
            pipe,
            sidecar,
            cfg,
            ledger,
            ..
        } = rig(
            sim,
            &["--idle-timeout", "1h", "--preemption", preemption],
            &stop,
        )
        .await;
        let client = serve_sidecar(&sidecar, &cfg, pipe, &stop);
        sidecar.start().await.unwrap().unwrap();
        let answer = tokio::spawn(async move {
            let (mut parts, body) = chat_with(format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":20,"stream":{streamed}}}"#
            ));
            if batch {
                parts.headers.insert(
                    greenthread_api::BATCH_HEADER,
                    http::HeaderValue::from_static("batch_1"),
                );
            }
            let resp = client.forward(&parts, body, ()).await.unwrap();
            axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap()
        });
        // The report of the answer starting (within a second of it, by the sidecar's
        // rule), awaited on the paused clock with a deadline well inside the answer.
        let reported = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let gpu = ledger.gpu("g-0").unwrap();
                if let Some(o) = gpu.status.occupants.first().filter(|o| o.in_flight == 1) {
                    return o.draining;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the answer in flight is reported");
        assert_eq!(
            reported, draining,
            "{preemption}, streamed {streamed}, batch {batch}"
        );
        answer.await.unwrap();
        stop.trigger();
        sidecar.shutdown().await;
    }
}
