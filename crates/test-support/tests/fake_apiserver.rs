//! The fake API server behaves like the real one where our code depends on it, driven
//! by a real `kube::Client`.

use futures_util::{StreamExt, TryStreamExt};
use greenthread_api::{GpuResource, GpuSpec, GpuStatus, Model};
use greenthread_test_support::FakeApiServer;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;

fn gpu(name: &str) -> GpuResource {
    GpuResource::new(
        name,
        GpuSpec {
            node: "n1".into(),
            index: 0,
            uuid: "GPU-1".into(),
            product: "H100".into(),
            memory_bytes: 80 << 30,
            host_memory_bytes: None,
        },
    )
}

fn api_status(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_get_conflict_and_the_status_subresource() {
    let server = FakeApiServer::start().await;
    let gpus: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let created = gpus
        .create(&PostParams::default(), &gpu("n1-0"))
        .await
        .unwrap();
    let rv1 = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.status.is_none(), "a create sets no status");
    assert_eq!(
        api_status(
            gpus.create(&PostParams::default(), &gpu("n1-0"))
                .await
                .unwrap_err()
        ),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        api_status(gpus.get("nope").await.unwrap_err()),
        (404, "NotFound".into())
    );

    // Compare-and-swap on status: the fresh version wins, the stale one gets 409.
    let mut with_status = created.clone();
    with_status.status = Some(GpuStatus {
        available_memory_bytes: Some(1),
        ..Default::default()
    });
    let written = gpus
        .replace_status("n1-0", &PostParams::default(), &with_status)
        .await
        .unwrap();
    let rv2 = written.metadata.resource_version.clone().unwrap();
    assert_ne!(rv1, rv2);
    assert_eq!(
        written.status.as_ref().unwrap().available_memory_bytes,
        Some(1)
    );
    let stale = gpus
        .replace_status("n1-0", &PostParams::default(), &with_status)
        .await
        .unwrap_err();
    assert_eq!(api_status(stale), (409, "Conflict".into()));

    // A spec write leaves status alone; a status patch leaves the spec alone.
    let mut respec = written.clone();
    respec.spec.product = "H200".into();
    respec.status = None;
    let replaced = gpus
        .replace("n1-0", &PostParams::default(), &respec)
        .await
        .unwrap();
    assert_eq!(replaced.spec.product, "H200");
    assert_eq!(
        replaced.status.as_ref().unwrap().available_memory_bytes,
        Some(1)
    );
    let patched = gpus
        .patch_status(
            "n1-0",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"availableMemoryBytes": 7}, "spec": {"product": "ignored"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().available_memory_bytes, Some(7));
    assert_eq!(patched.spec.product, "H200");
    assert!(
        server
            .store
            .requests("apis/greenthread.ai/v1alpha1/gpus/status")
            >= 3
    );
}

#[tokio::test]
async fn watch_streams_changes_from_a_version_with_bookmarks() {
    let server = FakeApiServer::start().await;
    let gpus: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let created = gpus
        .create(&PostParams::default(), &gpu("n1-0"))
        .await
        .unwrap();
    let from = created.metadata.resource_version.clone().unwrap();
    let mut stream = gpus
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            }
            .timeout(10),
            &from,
        )
        .await
        .unwrap()
        .boxed();
    gpus.patch_status(
        "n1-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"availableMemoryBytes": 3}})),
    )
    .await
    .unwrap();
    let mut saw_modified = false;
    let mut saw_bookmark = false;
    while !(saw_modified && saw_bookmark) {
        match tokio::time::timeout(std::time::Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Modified(g) => {
                assert_eq!(g.status.unwrap().available_memory_bytes, Some(3));
                saw_modified = true;
            }
            WatchEvent::Bookmark(_) => saw_bookmark = true,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn resuming_a_watch_from_before_the_kept_history_is_gone() {
    let server = FakeApiServer::start_with_history(2).await;
    let gpus: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let first = gpus
        .create(&PostParams::default(), &gpu("n1-0"))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    for i in 0..5 {
        gpus.patch_status(
            "n1-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"availableMemoryBytes": i}})),
        )
        .await
        .unwrap();
    }
    let err = match gpus.watch(&WatchParams::default(), &first).await {
        Err(e) => e,
        Ok(s) => s
            .boxed()
            .try_next()
            .await
            .expect_err("an error for an expired version"),
    };
    assert_eq!(api_status(err).0, 410, "a watcher must re-list");
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owners_collect_their_dependents() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let models: Api<Model> = Api::namespaced(client.clone(), "gt");
    let spec: greenthread_api::ModelSpec =
        serde_json::from_value(json!({"modelName": "m"})).unwrap();
    let mut m = Model::new("m", spec);
    m.metadata.finalizers = Some(vec!["greenthread.ai/cleanup".into()]);
    let m = models.create(&PostParams::default(), &m).await.unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, "gt");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "m-0", "ownerReferences": [{"apiVersion": "greenthread.ai/v1alpha1", "kind": "Model", "name": "m", "uid": m.metadata.uid.clone().unwrap()}]},
        "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    models.delete("m", &DeleteParams::default()).await.unwrap();
    let marked = models.get("m").await.unwrap();
    assert!(
        marked.metadata.deletion_timestamp.is_some(),
        "held by its finalizer"
    );
    assert!(pods.get("m-0").await.is_ok());
    models
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(api_status(models.get("m").await.unwrap_err()).0, 404);
    assert_eq!(
        api_status(pods.get("m-0").await.unwrap_err()).0,
        404,
        "the owner's pod was collected"
    );
}

#[tokio::test]
async fn server_side_apply_owns_fields_and_json_patch_tests_before_it_writes() {
    let server = FakeApiServer::start().await;
    let gpus: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    gpus.create(&PostParams::default(), &gpu("n1-0"))
        .await
        .unwrap();
    let apply = |product: &str| json!({"apiVersion": "greenthread.ai/v1alpha1", "kind": "GPU", "spec": {"product": product}});
    // The creator owns what it wrote: a must force to take .spec.product over.
    let err = gpus
        .patch(
            "n1-0",
            &PatchParams::apply("a"),
            &Patch::Apply(apply("A100")),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (409, "Conflict".into()));
    gpus.patch(
        "n1-0",
        &PatchParams::apply("a").force(),
        &Patch::Apply(apply("A100")),
    )
    .await
    .unwrap();
    // Then b may not change it without force, but may agree with it.
    let err = gpus
        .patch("n1-0", &PatchParams::apply("b"), &Patch::Apply(apply("L4")))
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (409, "Conflict".into()));
    gpus.patch(
        "n1-0",
        &PatchParams::apply("b"),
        &Patch::Apply(apply("A100")),
    )
    .await
    .unwrap();
    gpus.patch(
        "n1-0",
        &PatchParams::apply("b").force(),
        &Patch::Apply(apply("L4")),
    )
    .await
    .unwrap();
    assert_eq!(gpus.get("n1-0").await.unwrap().spec.product, "L4");
    // Now b owns it: a is the one refused.
    let err = gpus
        .patch(
            "n1-0",
            &PatchParams::apply("a"),
            &Patch::Apply(apply("A100")),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (409, "Conflict".into()));

    // JSON patch: a failed test writes nothing; add, replace and remove apply in order.
    let ops = |v: serde_json::Value| Patch::<()>::Json(serde_json::from_value(v).unwrap());
    let err = gpus
        .patch(
            "n1-0",
            &PatchParams::default(),
            &ops(
                json!([{"op": "test", "path": "/spec/product", "value": "H100"},
                        {"op": "replace", "path": "/spec/product", "value": "B200"}]),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(err).0, 422);
    assert_eq!(gpus.get("n1-0").await.unwrap().spec.product, "L4");
    gpus.patch(
        "n1-0",
        &PatchParams::default(),
        &ops(
            json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
                    {"op": "add", "path": "/metadata/finalizers/-", "value": "y"},
                    {"op": "remove", "path": "/metadata/finalizers/0"}]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        gpus.get("n1-0").await.unwrap().metadata.finalizers,
        Some(vec!["y".to_string()])
    );
}
