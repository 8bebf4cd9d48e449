//! The write semantics of the API server, as pure functions on JSON: merge patch
//! (RFC 7386), JSON patch (RFC 6902), and server-side apply's field ownership.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// RFC 6902 JSON patch: `test`, `add`, `remove`, `replace`, on RFC 6901 pointers.
/// A failed `test` or a missing path is the 422 a real server answers.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    fn split(path: &str) -> Result<(Vec<String>, String), String> {
        let mut parts: Vec<String> = path
            .strip_prefix('/')
            .ok_or_else(|| format!("invalid pointer {path:?}"))?
            .split('/')
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().unwrap_or_default();
        Ok((parts, last))
    }
    fn parent<'a>(v: &'a mut Value, parts: &[String], path: &str) -> Result<&'a mut Value, String> {
        let mut cur = v;
        for p in parts {
            cur = match cur {
                Value::Object(m) => m.get_mut(p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("path {path} does not exist"))?;
        }
        Ok(cur)
    }
    for op in ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?
    {
        let path = op["path"].as_str().ok_or("operation without a path")?;
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match op["op"].as_str().unwrap_or_default() {
            "test" => {
                if target.pointer(path).unwrap_or(&Value::Null) != &value {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            kind @ ("add" | "replace") => {
                if path.is_empty() {
                    *target = value;
                    continue;
                }
                let (parts, last) = split(path)?;
                match parent(target, &parts, path)? {
                    Value::Object(m) => {
                        if kind == "replace" && !m.contains_key(&last) {
                            return Err(format!(
                                "replace operation does not apply: doc is missing key: {path}"
                            ));
                        }
                        m.insert(last, value);
                    }
                    Value::Array(a) if last == "-" && kind == "add" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                        if kind == "add" && i <= a.len() {
                            a.insert(i, value);
                        } else if kind == "replace" && i < a.len() {
                            a[i] = value;
                        } else {
                            return Err(format!("index out of range: {path}"));
                        }
                    }
                    _ => return Err(format!("path {path} does not exist")),
                }
            }
            "remove" => {
                let (parts, last) = split(path)?;
                let removed = match parent(target, &parts, path)? {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => match last.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !removed {
                    return Err(format!(
                        "remove operation does not apply: doc is missing path: {path}"
                    ));
                }
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

/// Leaf fields of an object as `.a.b` paths (arrays are atomic), without the fields the
/// server owns (type and identity metadata).
fn leaves(v: &Value) -> BTreeMap<String, Value> {
    fn walk(v: &Value, prefix: String, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    walk(v, format!("{prefix}.{k}"), out);
                }
            }
            other => {
                out.insert(prefix, other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(v, String::new(), &mut out);
    out.retain(|path, value| {
        !value.is_null()
            && !matches!(path.as_str(), ".apiVersion" | ".kind")
            && (!path.starts_with(".metadata.")
                || path.starts_with(".metadata.labels.")
                || path.starts_with(".metadata.annotations.")
                || path.starts_with(".metadata.finalizers"))
    });
    out
}

/// The 409 a real server gives an apply that would take fields from another manager.
pub fn apply_conflicts(
    owners: Option<&BTreeMap<String, String>>,
    current: &Value,
    patch: &Value,
    manager: &str,
) -> Vec<String> {
    let Some(owners) = owners else {
        return Vec::new();
    };
    let now = leaves(current);
    leaves(patch)
        .into_iter()
        .filter(|(path, value)| {
            owners.get(path).is_some_and(|owner| owner != manager) && now.get(path) != Some(value)
        })
        .map(|(path, _)| format!("conflict with \"{}\": {path}", owners[&path]))
        .collect()
}

/// Who owns what after a write: an apply takes every field it names; other writes take
/// the fields they changed; fields that are gone have no owner.
pub fn take_ownership(
    owners: &mut BTreeMap<String, String>,
    before: &Value,
    after: &Value,
    applied: Option<&Value>,
    manager: &str,
) {
    let (old, new) = (leaves(before), leaves(after));
    owners.retain(|path, _| new.contains_key(path));
    let taken: Vec<String> = match applied {
        Some(patch) => leaves(patch).into_keys().collect(),
        None => new
            .iter()
            .filter(|(p, v)| old.get(*p) != Some(v))
            .map(|(p, _)| p.clone())
            .collect(),
    };
    for path in taken {
        if new.contains_key(&path) {
            owners.insert(path, manager.to_string());
        }
    }
}
