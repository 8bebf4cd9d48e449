//! The fake API server's objects, without HTTP: create, get, write (put, merge patch,
//! JSON patch, server-side apply with field ownership), delete (finalizers, owner
//! garbage collection), list with selectors, and the events since a resource version.
//! Pure: the time is an argument, events are kept in a log the HTTP layer forwards to
//! its watches.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::patch::{apply_conflicts, json_patch, merge_patch, take_ownership};

/// Where an object lives: its resource (e.g. `apis/greenthread.ai/v1alpha1/gpus`), its
/// namespace (empty for cluster objects) and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(resource: &str, namespace: &str, name: &str) -> Self {
        Self {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub resource: String,
    pub namespace: String,
    /// `ADDED`, `MODIFIED`, `DELETED` (or `BOOKMARK`, made by watches).
    pub kind: &'static str,
    pub object: Value,
}

/// An answer other than success, as the API server's `Status` object says it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }
}

/// How a write changes the object.
#[derive(Debug, Clone)]
pub enum Write {
    /// Replace (PUT).
    Put(Value),
    /// RFC 7386 merge patch (strategic merge patches are treated the same).
    Merge(Value),
    /// RFC 6902 JSON patch.
    JsonPatch(Value),
    /// Server-side apply: the manager takes every field it names; a field another
    /// manager owns with another value is a conflict unless forced.
    Apply { patch: Value, force: bool },
}

/// Label and field selectors of a list or watch (`a=b,c=d`, `metadata.name=x`).
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: Option<String>,
    pub fields: Option<String>,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(sel) = &self.labels {
            for term in sel.split(',').filter(|t| !t.is_empty()) {
                let (k, v) = term
                    .split_once('=')
                    .map(|(k, v)| (k, v.trim_start_matches('=')))
                    .unwrap_or((term, ""));
                if obj["metadata"]["labels"][k].as_str() != Some(v) {
                    return false;
                }
            }
        }
        if let Some(sel) = &self.fields {
            for term in sel.split(',').filter(|t| !t.is_empty()) {
                if let Some(name) = term.strip_prefix("metadata.name=")
                    && obj["metadata"]["name"].as_str() != Some(name.trim_start_matches('='))
                {
                    return false;
                }
            }
        }
        true
    }
}

pub struct ObjectStore {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    /// Field ownership per object: leaf path → field manager.
    owners: BTreeMap<Key, BTreeMap<String, String>>,
    /// Every event with its resource version, for watches that resume (oldest first).
    log: Vec<(u64, Event)>,
    /// Events kept; older resource versions are gone (410).
    history: usize,
    /// Events not yet taken by [`ObjectStore::take_new_events`].
    fresh: usize,
}

impl ObjectStore {
    pub fn new(history: usize) -> Self {
        Self {
            rv: 0,
            uid: 0,
            objects: BTreeMap::new(),
            owners: BTreeMap::new(),
            log: Vec::new(),
            history,
            fresh: 0,
        }
    }

    /// The latest resource version.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Events recorded since the last call, for live watches.
    pub fn take_new_events(&mut self) -> Vec<(u64, Event)> {
        let n = std::mem::take(&mut self.fresh).min(self.log.len());
        self.log[self.log.len() - n..].to_vec()
    }

    fn record(&mut self, rv: u64, event: Event) {
        self.log.push((rv, event));
        self.fresh += 1;
        if self.log.len() > self.history {
            let drop = self.log.len() - self.history;
            self.log.drain(..drop);
        }
    }

    /// Writes `obj` at `key` with a new resource version and records the event.
    fn commit(&mut self, key: Key, mut obj: Value, kind: &'static str) -> Value {
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), obj.clone());
        self.record(
            rv,
            Event {
                resource: key.resource,
                namespace: key.namespace,
                kind,
                object: obj.clone(),
            },
        );
        obj
    }

    pub fn get(&self, key: &Key) -> Result<Value, Refusal> {
        self.objects.get(key).cloned().ok_or_else(|| not_found(key))
    }

    /// Every object of `resource` (in `namespace` if given) that the selectors match.
    pub fn list(&self, resource: &str, namespace: Option<&str>, sel: &Selectors) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, o)| {
                k.resource == resource
                    && namespace.is_none_or(|n| k.namespace == n)
                    && sel.matches(o)
            })
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Creates `obj` under `resource` in `namespace` (`None`: a cluster object): a uid,
    /// the creation time `now`, generation 1, no status (that is a subresource).
    pub fn create(
        &mut self,
        resource: &str,
        namespace: Option<&str>,
        mut obj: Value,
        manager: &str,
        now: jiff::Timestamp,
    ) -> Result<Value, Refusal> {
        let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
            return Err(Refusal::new(
                422,
                "Invalid",
                "metadata.name: Required value",
            ));
        };
        let key = Key::new(resource, namespace.unwrap_or_default(), &name);
        if self.objects.contains_key(&key) {
            return Err(Refusal::new(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            ));
        }
        self.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.uid));
        if let Some(ns) = namespace {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["metadata"]["creationTimestamp"] =
            json!(now.round(jiff::Unit::Second).unwrap().to_string());
        obj["metadata"]["generation"] = json!(1);
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
        let mut owners = BTreeMap::new();
        take_ownership(&mut owners, &Value::Null, &obj, None, manager);
        self.owners.insert(key.clone(), owners);
        Ok(self.commit(key, obj, "ADDED"))
    }

    /// Writes the object at `key`, or only its status with `status`. A resource version
    /// in the body must be the current one (409 otherwise). Spec writes leave status
    /// alone and bump the generation when the spec changes; status writes leave the
    /// rest alone. Identity metadata always stays. Once a deleting object has no
    /// finalizers left, it goes.
    pub fn write(
        &mut self,
        key: &Key,
        status: bool,
        write: Write,
        manager: &str,
    ) -> Result<Value, Refusal> {
        let current = self.get(key)?;
        let incoming = match &write {
            Write::Put(v) | Write::Merge(v) | Write::JsonPatch(v) => v,
            Write::Apply { patch, .. } => patch,
        };
        if let Some(rv) = incoming["metadata"]["resourceVersion"].as_str()
            && rv
                != current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return Err(Refusal::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    key.resource, key.name
                ),
            ));
        }
        if let Write::Apply {
            patch,
            force: false,
        } = &write
        {
            let conflicts = apply_conflicts(self.owners.get(key), &current, patch, manager);
            if !conflicts.is_empty() {
                return Err(Refusal::new(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with {} conflict{}: {}",
                        conflicts.len(),
                        if conflicts.len() == 1 { "" } else { "s" },
                        conflicts.join(", ")
                    ),
                ));
            }
        }
        let mut next = match &write {
            Write::Put(v) => v.clone(),
            Write::JsonPatch(ops) => {
                let mut patched = current.clone();
                json_patch(&mut patched, ops).map_err(|e| Refusal::new(422, "Invalid", e))?;
                patched
            }
            Write::Merge(v) | Write::Apply { patch: v, .. } => {
                let mut merged = current.clone();
                merge_patch(&mut merged, v);
                merged
            }
        };
        if status {
            let mut only_status = current.clone();
            only_status["status"] = next.get("status").cloned().unwrap_or(Value::Null);
            next = only_status;
        } else {
            next["status"] = current.get("status").cloned().unwrap_or(Value::Null);
            if next["spec"] != current["spec"] {
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                next["metadata"]["generation"] = json!(generation);
            }
        }
        if next["status"].is_null() {
            next.as_object_mut().unwrap().remove("status");
        }
        for keep in [
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "deletionTimestamp",
        ] {
            if !current["metadata"][keep].is_null() {
                next["metadata"][keep] = current["metadata"][keep].clone();
            }
        }
        let finalized = !next["metadata"]["deletionTimestamp"].is_null()
            && next["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        let applied = match &write {
            Write::Apply { patch, .. } => Some(patch),
            _ => None,
        };
        let mut owners = self.owners.remove(key).unwrap_or_default();
        take_ownership(&mut owners, &current, &next, applied, manager);
        self.owners.insert(key.clone(), owners);
        let when = next["metadata"]["deletionTimestamp"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let written = self.commit(key.clone(), next, "MODIFIED");
        if finalized {
            // Dependents are deleted as of the owner's deletion.
            self.remove_collecting(key, when);
        }
        Ok(written)
    }

    /// Deletes now, or marks for deletion at `now` while finalizers remain; returns the
    /// object as it was last.
    pub fn delete(&mut self, key: &Key, now: jiff::Timestamp) -> Result<Value, Refusal> {
        let obj = self.get(key)?;
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !has_finalizers {
            return Ok(self.remove_collecting(key, now).unwrap_or(obj));
        }
        if obj["metadata"]["deletionTimestamp"].is_null() {
            let mut marked = obj;
            marked["metadata"]["deletionTimestamp"] = json!(now.to_string());
            return Ok(self.commit(key.clone(), marked, "MODIFIED"));
        }
        Ok(obj)
    }

    /// Removes the object, then (garbage collection) deletes its dependents.
    fn remove_collecting(&mut self, key: &Key, now: jiff::Timestamp) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.owners.remove(key);
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            rv,
            Event {
                resource: key.resource.clone(),
                namespace: key.namespace.clone(),
                kind: "DELETED",
                object: obj.clone(),
            },
        );
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for d in dependents {
            let _ = self.delete(&d, now);
        }
        Some(obj)
    }

    /// What a watch from resource version `since` sees first: with no version (0), the
    /// current objects as `ADDED`; otherwise the events after `since`, or 410 when the
    /// log no longer reaches back that far.
    pub fn events_since(&self, since: u64) -> Result<Vec<(u64, Event)>, Refusal> {
        let oldest = self.log.first().map_or(self.rv + 1, |(rv, _)| *rv);
        if since != 0 && since + 1 < oldest {
            return Err(Refusal::new(
                410,
                "Expired",
                format!("too old resource version: {since} ({})", oldest - 1),
            ));
        }
        if since == 0 {
            return Ok(self
                .objects
                .iter()
                .map(|(k, o)| {
                    (
                        self.rv,
                        Event {
                            resource: k.resource.clone(),
                            namespace: k.namespace.clone(),
                            kind: "ADDED",
                            object: o.clone(),
                        },
                    )
                })
                .collect());
        }
        Ok(self
            .log
            .iter()
            .filter(|(rv, _)| *rv > since)
            .cloned()
            .collect())
    }

    /// The `apiVersion` and `kind` of `resource`'s objects, for bookmarks.
    pub fn kind_of(&self, resource: &str) -> (String, String) {
        self.objects
            .iter()
            .find(|(k, _)| k.resource == resource)
            .map(|(_, o)| {
                (
                    o["apiVersion"].as_str().unwrap_or("v1").to_string(),
                    o["kind"].as_str().unwrap_or("Unknown").to_string(),
                )
            })
            .unwrap_or_else(|| ("v1".into(), "Unknown".into()))
    }
}

fn not_found(key: &Key) -> Refusal {
    Refusal::new(
        404,
        "NotFound",
        format!("{} \"{}\" not found", key.resource, key.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPUS: &str = "apis/greenthread.ai/v1alpha1/gpus";
    const PODS: &str = "api/v1/pods";

    fn t(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn gpu(name: &str) -> Value {
        json!({"apiVersion": "greenthread.ai/v1alpha1", "kind": "GPU",
               "metadata": {"name": name}, "spec": {"node": "n", "memoryBytes": 80},
               "status": {"occupants": []}})
    }

    fn key(name: &str) -> Key {
        Key::new(GPUS, "gt", name)
    }

    fn rv(v: &Value) -> String {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn create_sets_identity_drops_status_and_refuses_a_second() {
        let mut s = ObjectStore::new(100);
        let a = s.create(GPUS, Some("gt"), gpu("a"), "m", t(0)).unwrap();
        assert_eq!(a["metadata"]["namespace"], "gt");
        assert_eq!(a["metadata"]["generation"], 1);
        assert_eq!(a["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
        assert!(
            a["metadata"]["uid"]
                .as_str()
                .unwrap()
                .ends_with("000000000001")
        );
        assert!(a.get("status").is_none(), "status is a subresource");
        assert_eq!(rv(&a), "1");
        let again = s.create(GPUS, Some("gt"), gpu("a"), "m", t(1)).unwrap_err();
        assert_eq!((again.code, again.reason), (409, "AlreadyExists"));
        let nameless = s.create(GPUS, Some("gt"), json!({"metadata": {}}), "m", t(1));
        assert_eq!(nameless.unwrap_err().code, 422);
        assert_eq!(s.get(&key("b")).unwrap_err().code, 404);
    }

    #[test]
    fn a_stale_resource_version_is_a_conflict_and_writes_nothing() {
        let mut s = ObjectStore::new(100);
        let a = s.create(GPUS, Some("gt"), gpu("a"), "m", t(0)).unwrap();
        let mut first = a.clone();
        first["spec"]["memoryBytes"] = json!(81);
        let written = s.write(&key("a"), false, Write::Put(first), "m").unwrap();
        assert_eq!(written["metadata"]["generation"], 2);
        let mut stale = a.clone();
        stale["spec"]["memoryBytes"] = json!(82);
        let e = s
            .write(&key("a"), false, Write::Put(stale), "m")
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        assert_eq!(s.get(&key("a")).unwrap()["spec"]["memoryBytes"], 81);
    }

    #[test]
    fn status_and_spec_writes_leave_each_other_alone() {
        let mut s = ObjectStore::new(100);
        s.create(GPUS, Some("gt"), gpu("a"), "m", t(0)).unwrap();
        let status = json!({"status": {"occupants": [{"podName": "p"}]}, "spec": {"node": "x"}});
        let w = s.write(&key("a"), true, Write::Merge(status), "m").unwrap();
        assert_eq!(w["spec"]["node"], "n", "a status write changes no spec");
        assert_eq!(w["status"]["occupants"][0]["podName"], "p");
        assert_eq!(w["metadata"]["generation"], 1);
        let spec = json!({"spec": {"node": "y"}, "status": null});
        let w = s.write(&key("a"), false, Write::Merge(spec), "m").unwrap();
        assert_eq!(w["spec"]["node"], "y");
        assert_eq!(
            w["status"]["occupants"][0]["podName"], "p",
            "a spec write keeps status"
        );
        assert_eq!(w["metadata"]["generation"], 2);
        // A write that does not change the spec keeps the generation.
        let w = s
            .write(
                &key("a"),
                false,
                Write::Merge(json!({"metadata": {"labels": {"l": "1"}}})),
                "m",
            )
            .unwrap();
        assert_eq!(w["metadata"]["generation"], 2);
    }

    #[test]
    fn merge_nulls_remove_and_a_failed_json_patch_test_writes_nothing() {
        let mut s = ObjectStore::new(100);
        let a = s.create(GPUS, Some("gt"), gpu("a"), "m", t(0)).unwrap();
        let w = s
            .write(
                &key("a"),
                false,
                Write::Merge(json!({"spec": {"node": null}})),
                "m",
            )
            .unwrap();
        assert!(w["spec"].get("node").is_none());
        let ops = json!([{"op": "test", "path": "/spec/memoryBytes", "value": 1},
                         {"op": "replace", "path": "/spec/memoryBytes", "value": 2}]);
        let e = s
            .write(&key("a"), false, Write::JsonPatch(ops), "m")
            .unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(s.get(&key("a")).unwrap()["spec"]["memoryBytes"], 80);
        assert!(rv(&s.get(&key("a")).unwrap()) > rv(&a));
        let ops = json!([{"op": "test", "path": "/spec/memoryBytes", "value": 80},
                         {"op": "add", "path": "/spec/tags", "value": ["x"]},
                         {"op": "add", "path": "/spec/tags/-", "value": "y"}]);
        let w = s
            .write(&key("a"), false, Write::JsonPatch(ops), "m")
            .unwrap();
        assert_eq!(w["spec"]["tags"], json!(["x", "y"]));
    }

    #[test]
    fn apply_takes_fields_and_conflicts_with_another_owner_unless_forced() {
        let mut s = ObjectStore::new(100);
        let lease = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}});
        let k = Key::new("apis/coordination.k8s.io/v1/leases", "gt", "l");
        s.write_or_create_for_test(&k, lease.clone(), "a");
        let take = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "b"}});
        let e = s
            .write(
                &k,
                false,
                Write::Apply {
                    patch: take.clone(),
                    force: false,
                },
                "b",
            )
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        assert!(e.message.contains(".spec.holderIdentity"), "{}", e.message);
        // The same value is no conflict; forcing takes the field.
        s.write(
            &k,
            false,
            Write::Apply {
                patch: lease,
                force: false,
            },
            "b",
        )
        .unwrap();
        let w = s
            .write(
                &k,
                false,
                Write::Apply {
                    patch: take,
                    force: true,
                },
                "b",
            )
            .unwrap();
        assert_eq!(w["spec"]["holderIdentity"], "b");
        let back = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}});
        let e = s
            .write(
                &k,
                false,
                Write::Apply {
                    patch: back,
                    force: false,
                },
                "a",
            )
            .unwrap_err();
        assert_eq!(e.code, 409, "b owns it now");
    }

    #[test]
    fn finalizers_hold_a_delete_and_owners_take_their_dependents_along() {
        let mut s = ObjectStore::new(100);
        let mut model = gpu("owner");
        model["metadata"]["finalizers"] = json!(["greenthread.ai/cleanup"]);
        let owner = s.create(GPUS, Some("gt"), model, "m", t(0)).unwrap();
        let uid = owner["metadata"]["uid"].clone();
        let pod = json!({"metadata": {"name": "p", "ownerReferences": [{"uid": uid}]}});
        s.create(PODS, Some("gt"), pod, "m", t(0)).unwrap();
        let marked = s.delete(&key("owner"), t(5)).unwrap();
        assert_eq!(marked["metadata"]["deletionTimestamp"], t(5).to_string());
        assert!(s.get(&key("owner")).is_ok(), "held by its finalizer");
        // Deleting again changes nothing.
        assert_eq!(s.delete(&key("owner"), t(9)).unwrap(), marked);
        // The last finalizer removed: the object goes, and its pod with it.
        s.write(
            &key("owner"),
            false,
            Write::Merge(json!({"metadata": {"finalizers": []}})),
            "m",
        )
        .unwrap();
        assert_eq!(s.get(&key("owner")).unwrap_err().code, 404);
        assert_eq!(s.get(&Key::new(PODS, "gt", "p")).unwrap_err().code, 404);
        let kinds: Vec<&str> = s
            .events_since(1)
            .unwrap()
            .iter()
            .map(|(_, e)| e.kind)
            .collect();
        assert_eq!(
            kinds,
            ["ADDED", "MODIFIED", "MODIFIED", "DELETED", "DELETED"]
        );
    }

    #[test]
    fn events_since_a_version_resume_or_are_gone() {
        let mut s = ObjectStore::new(3);
        for n in ["a", "b", "c", "d", "e"] {
            s.create(GPUS, Some("gt"), gpu(n), "m", t(0)).unwrap();
        }
        assert_eq!(s.resource_version(), 5);
        // The log keeps versions 3 to 5: a watcher that saw 2 resumes, one that saw 1 cannot.
        let after_2: Vec<u64> = s
            .events_since(2)
            .unwrap()
            .iter()
            .map(|(rv, _)| *rv)
            .collect();
        assert_eq!(after_2, [3, 4, 5]);
        let e = s.events_since(1).unwrap_err();
        assert_eq!((e.code, e.reason), (410, "Expired"));
        // No version: the current objects, as ADDED.
        assert_eq!(s.events_since(0).unwrap().len(), 5);
        // New events are handed to the watches once.
        assert_eq!(s.take_new_events().len(), 3, "capped by the history");
        assert!(s.take_new_events().is_empty());
        s.delete(&key("a"), t(1)).unwrap();
        assert_eq!(s.take_new_events()[0].1.kind, "DELETED");
    }

    #[test]
    fn lists_filter_by_namespace_and_selectors() {
        let mut s = ObjectStore::new(100);
        let mut labelled = gpu("a");
        labelled["metadata"]["labels"] = json!({"app": "x"});
        s.create(GPUS, Some("gt"), labelled, "m", t(0)).unwrap();
        s.create(GPUS, Some("gt"), gpu("b"), "m", t(0)).unwrap();
        s.create(GPUS, Some("other"), gpu("c"), "m", t(0)).unwrap();
        let all = Selectors::default();
        assert_eq!(s.list(GPUS, None, &all).len(), 3);
        assert_eq!(s.list(GPUS, Some("gt"), &all).len(), 2);
        let by_label = Selectors {
            labels: Some("app=x".into()),
            fields: None,
        };
        assert_eq!(s.list(GPUS, None, &by_label)[0]["metadata"]["name"], "a");
        let by_name = Selectors {
            labels: None,
            fields: Some("metadata.name=c".into()),
        };
        assert_eq!(
            s.list(GPUS, None, &by_name)[0]["metadata"]["namespace"],
            "other"
        );
    }

    impl ObjectStore {
        /// Creates `obj` at `k` as `manager` (for tests that start from an owned object).
        fn write_or_create_for_test(&mut self, k: &Key, obj: Value, manager: &str) {
            self.create(&k.resource, Some(&k.namespace), obj, manager, t(0))
                .unwrap();
        }
    }
}
