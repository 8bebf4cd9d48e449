//! The chart's ValidatingAdmissionPolicy on the GPU records (security review finding 8):
//! its CEL, as rendered by real Helm, evaluated on the changes the sidecar's protocol
//! makes (allowed) and on a tenant's pod touching another's entries (denied).

use std::{collections::HashMap, sync::Arc};

use greenthread_test_support::chart::{find, render};
use kube_cel::{
    KubeCelExt,
    cel::{
        Context, Program, Value,
        objects::{Key, Map},
    },
};
use serde_json::{Value as Json, json};

/// The policy's verdict on one update by `user` (`None`: the policy does not apply).
fn admit(policy: &Json, user: &Json, old: &Json, new: &Json) -> Option<Result<(), String>> {
    let spec = &policy["spec"];
    let mut ctx = Context::default().with_all();
    ctx.add_variable("object", new.clone()).unwrap();
    ctx.add_variable("oldObject", old.clone()).unwrap();
    ctx.add_variable("request", json!({"operation": "UPDATE", "userInfo": user}))
        .unwrap();
    let eval = |ctx: &Context, expr: &str| {
        Program::compile(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .execute(ctx)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    };
    for c in spec["matchConditions"].as_array().unwrap() {
        if eval(&ctx, c["expression"].as_str().unwrap()) != Value::Bool(true) {
            return None;
        }
    }
    let mut variables = HashMap::new();
    for v in spec["variables"].as_array().unwrap() {
        let mut with = Context::default().with_all();
        with.add_variable("object", new.clone()).unwrap();
        with.add_variable("oldObject", old.clone()).unwrap();
        with.add_variable("request", json!({"operation": "UPDATE", "userInfo": user}))
            .unwrap();
        with.add_variable_from_value(
            "variables",
            Value::Map(Map {
                map: Arc::new(variables.clone()),
            }),
        );
        let value = eval(&with, v["expression"].as_str().unwrap());
        variables.insert(
            Key::String(Arc::new(v["name"].as_str().unwrap().into())),
            value,
        );
    }
    ctx.add_variable_from_value(
        "variables",
        Value::Map(Map {
            map: Arc::new(variables),
        }),
    );
    for v in spec["validations"].as_array().unwrap() {
        if eval(&ctx, v["expression"].as_str().unwrap()) != Value::Bool(true) {
            let msg = match v["messageExpression"].as_str() {
                Some(m) => match eval(&ctx, m) {
                    Value::String(s) => s.to_string(),
                    other => format!("{other:?}"),
                },
                None => v["message"].as_str().unwrap_or_default().to_string(),
            };
            return Some(Err(msg));
        }
    }
    Some(Ok(()))
}

fn sidecar(namespace: &str, pod: Option<&str>) -> Json {
    let mut extra = json!({});
    if let Some(p) = pod {
        extra["authentication.kubernetes.io/pod-name"] = json!([p]);
    }
    json!({
        "username": format!("system:serviceaccount:{namespace}:greenthread-model"),
        "groups": ["system:serviceaccounts"],
        "extra": extra,
    })
}

fn occupant(pod: &str, state: &str, reserved: u64) -> Json {
    json!({"podName": pod, "modelName": "org/llama", "state": state, "reservedMemoryBytes": reserved,
           "residualMemoryBytes": 0, "popular": false, "minRuntime": "10s",
           "heartbeat": "2026-12-01T10:00:00Z"})
}

fn gpu(status: Json) -> Json {
    json!({"apiVersion": "greenthread.ai/v1alpha1", "kind": "GPU",
           "metadata": {"name": "node-a-0", "namespace": "greenthread-system"},
           "spec": {"node": "node-a", "index": 0, "uuid": "GPU-1", "product": "H100", "memoryBytes": 85899345920u64},
           "status": status})
}

#[test]
fn a_model_pod_may_change_only_its_own_ledger_entries() {
    let objects = render(&[]);
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "greenthread-gpu-ledger",
    );
    let binding = find(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "greenthread-gpu-ledger",
    );
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    let a = sidecar("team-a", Some("llama-0"));
    let (me, other) = ("team-a/llama-0", "team-b/llama-0");
    let intent = |pod: &str, victim: Option<&str>| {
        let mut i = json!({"podName": pod, "modelName": "org/m", "neededBytes": 10, "since": "2026-12-01T10:00:00Z"});
        if let Some(v) = victim {
            i["victimPodName"] = json!(v);
        }
        i
    };
    let lock = |pod: &str| json!({"podName": pod, "since": "2026-12-01T10:00:00Z"});
    let base = json!({"occupants": [occupant(me, "sleeping", 0), occupant(other, "serving", 20)],
                      "stats": {"usedMemoryBytes": 1}});
    let with = |patch: Json| {
        let mut s = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            s[k] = v.clone();
        }
        gpu(s)
    };
    let allowed = [
        (
            "first write: registers itself",
            gpu(json!({})),
            gpu(json!({"occupants": [occupant(me, "sleeping", 0)]})),
        ),
        (
            "claims its memory under its own lock",
            with(json!({})),
            with(
                json!({"occupants": [occupant(me, "waking", 20), occupant(other, "serving", 20)], "wakeLock": lock(me)}),
            ),
        ),
        (
            "marks itself serving, releases its lock",
            with(
                json!({"occupants": [occupant(me, "waking", 20), occupant(other, "serving", 20)], "wakeLock": lock(me)}),
            ),
            with(
                json!({"occupants": [occupant(me, "serving", 20), occupant(other, "serving", 20)]}),
            ),
        ),
        (
            "writes its intent and names a victim",
            with(json!({})),
            with(json!({"preemptionIntents": [intent(me, Some(other))]})),
        ),
        (
            "as a victim that slept, clears itself from the waker's intent",
            with(
                json!({"occupants": [occupant(me, "serving", 20), occupant(other, "sleeping", 0)], "preemptionIntents": [intent(other, Some(me))]}),
            ),
            with(
                json!({"occupants": [occupant(me, "sleeping", 0), occupant(other, "sleeping", 0)], "preemptionIntents": [intent(other, None)]}),
            ),
        ),
        (
            "takes over a lock whose holder went silent",
            with(json!({"wakeLock": lock(other)})),
            with(json!({"wakeLock": lock(me)})),
        ),
    ];
    for (what, old, new) in &allowed {
        assert_eq!(admit(policy, &a, old, new), Some(Ok(())), "{what}");
    }
    let denied = [
        (
            "releases another tenant's memory",
            with(json!({})),
            with(
                json!({"occupants": [occupant(me, "sleeping", 0), occupant(other, "sleeping", 0)]}),
            ),
            "own occupant",
        ),
        (
            "removes another's occupant",
            with(json!({})),
            with(json!({"occupants": [occupant(me, "sleeping", 0)]})),
            "own occupant",
        ),
        (
            "adds an occupant in another's name",
            gpu(json!({})),
            gpu(json!({"occupants": [occupant(other, "serving", 1)]})),
            "own occupant",
        ),
        (
            "drops another's wake lock",
            with(json!({"wakeLock": lock(other)})),
            with(json!({})),
            "wake lock",
        ),
        (
            "gives the lock to another",
            with(json!({})),
            with(json!({"wakeLock": lock(other)})),
            "wake lock",
        ),
        (
            "names a victim on another's intent",
            with(json!({"preemptionIntents": [intent(other, None)]})),
            with(json!({"preemptionIntents": [intent(other, Some("team-c/x-0"))]})),
            "intent",
        ),
        (
            "removes another's intent",
            with(json!({"preemptionIntents": [intent(other, None)]})),
            with(json!({})),
            "intent",
        ),
        (
            "rewrites the GPU's statistics",
            with(json!({})),
            with(json!({"stats": {"usedMemoryBytes": 0}})),
            "agent",
        ),
    ];
    for (what, old, new, says) in &denied {
        match admit(policy, &a, old, new) {
            Some(Err(msg)) => assert!(msg.contains(says), "{what}: {msg}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Same pod name, other namespace: not the same pod.
    let b_same_name = sidecar("team-b", Some("llama-0"));
    let (old, new) = (&allowed[2].1, &allowed[2].2);
    assert!(matches!(
        admit(policy, &b_same_name, old, new),
        Some(Err(_))
    ));
    // A token that names no pod (a long-lived secret token) may change nothing.
    let unbound = sidecar("team-a", None);
    let r = admit(policy, &unbound, &allowed[1].1, &allowed[1].2);
    assert!(
        matches!(&r, Some(Err(m)) if m.contains("name its pod")),
        "{r:?}"
    );
    // Other users (the controller, the agent) are not this policy's concern.
    let controller = json!({"username": "system:serviceaccount:greenthread-system:greenthread-controller", "groups": [], "extra": {}});
    assert_eq!(admit(policy, &controller, &denied[0].1, &denied[0].2), None);
}
