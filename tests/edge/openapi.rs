//! `docs/control-api.yaml` is kept true: real responses of the control API are checked
//! against it (status documented for the operation, JSON body valid for its schema),
//! and every documented operation is exercised.

use crate::support::{raw_request, Edge, Response};
use crate::Fixture;
use serde_json::{json, Value};
use std::collections::BTreeSet;

struct Spec(Value);

impl Spec {
    fn load() -> Spec {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/control-api.yaml")).expect("spec");
        Spec(serde_norway::from_str(&text).expect("spec is YAML"))
    }

    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let mut cur = &self.0;
                for part in r.trim_start_matches("#/").split('/') {
                    cur = &cur[part];
                }
                assert!(!cur.is_null(), "dangling $ref {r}");
                self.resolve(cur)
            }
            None => v,
        }
    }

    /// The path template matching `path` (the one with most literal segments).
    fn template(&self, path: &str) -> Option<String> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let paths = self.0["paths"].as_object()?;
        paths
            .keys()
            .filter_map(|t| {
                let ts: Vec<&str> = t.trim_matches('/').split('/').collect();
                if ts.len() != segs.len() {
                    return None;
                }
                let mut literal = 0;
                for (a, b) in ts.iter().zip(&segs) {
                    if a.starts_with('{') {
                        continue;
                    }
                    if a != b {
                        return None;
                    }
                    literal += 1;
                }
                Some((literal, t.clone()))
            })
            .max()
            .map(|(_, t)| t)
    }

    fn check(&self, method: &str, path: &str, r: &Response) -> Result<String, String> {
        let path = path.split('?').next().unwrap_or(path);
        let t = self.template(path).ok_or_else(|| format!("{path} is not documented"))?;
        let op = &self.0["paths"][&t][method.to_ascii_lowercase()];
        if op.is_null() {
            return Err(format!("{method} {t} is not documented"));
        }
        let resp =
            op["responses"].get(r.status.to_string()).ok_or_else(|| format!("{method} {t}: status {} is not documented", r.status))?;
        let resp = self.resolve(resp);
        let ct = r.header("content-type").unwrap_or_default();
        if ct.starts_with("application/json") {
            let schema = &resp["content"]["application/json"]["schema"];
            if schema.is_null() {
                return Err(format!("{method} {t} {}: JSON body not documented", r.status));
            }
            let body: Value = serde_json::from_slice(&r.body).map_err(|e| format!("{method} {t}: body is not JSON: {e}"))?;
            self.validate(schema, &body, "$").map_err(|e| format!("{method} {t} {}: {e}: {body}", r.status))?;
        } else if resp["content"].get(ct.split(';').next().unwrap_or("")).is_none() {
            return Err(format!("{method} {t} {}: content type {ct} not documented", r.status));
        }
        Ok(format!("{} {t}", method.to_ascii_lowercase()))
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let s = self.resolve(schema);
        if let Some(t) = s["type"].as_str() {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_u64() || v.is_i64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                _ => true,
            };
            if !ok {
                return Err(format!("{at}: expected {t}"));
            }
        }
        if let Some(e) = s["enum"].as_array() {
            if !e.contains(v) {
                return Err(format!("{at}: {v} not in {e:?}"));
            }
        }
        if let Some(obj) = v.as_object() {
            for req in s["required"].as_array().into_iter().flatten() {
                let k = req.as_str().unwrap_or_default();
                if !obj.contains_key(k) {
                    return Err(format!("{at}: missing required `{k}`"));
                }
            }
            let props = s["properties"].as_object();
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => self.validate(ps, val, &format!("{at}.{k}"))?,
                    None if s["additionalProperties"] == json!(false) => return Err(format!("{at}: undocumented field `{k}`")),
                    None => {}
                }
            }
        }
        if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
            for (i, e) in arr.iter().enumerate() {
                self.validate(items, e, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }

    fn operations(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (t, item) in self.0["paths"].as_object().into_iter().flatten() {
            for m in ["get", "put", "post", "delete"] {
                if item.get(m).is_some() {
                    out.insert(format!("{m} {t}"));
                }
            }
        }
        out
    }
}

#[tokio::test]
async fn responses_match_the_openapi_document() {
    let spec = Spec::load();
    let f = Fixture::start().await;
    let edge = Edge::start_with("max_body_bytes = 2048", &f.toml("")).await;
    let sb = json!({"id": "apibox", "workspace": "ws_1", "address": "127.0.0.3", "previews": [{"port": f.pb(), "access": "public"}]});
    let dep = json!({"id": "dep_api", "workspace": "ws_1", "name": "api-app", "active_version": "v1",
        "domains": [{"host": "api-app.customer.test", "verified": false}],
        "versions": [{"id": "v1", "release": {"kind": "dynamic", "instances": [f.d1.addr.to_string()]}},
                     {"id": "v2", "release": {"kind": "dynamic", "instances": [f.d2.addr.to_string()]}}]});
    type Call<'a> = (&'a str, String, Option<String>, Vec<(&'a str, String)>);
    let calls: Vec<Call> = vec![
        ("GET", "/healthz".into(), None, vec![]),
        ("GET", "/readyz".into(), None, vec![]),
        ("GET", "/metrics".into(), None, vec![]),
        ("GET", "/v1/openapi.yaml".into(), None, vec![]),
        ("GET", "/v1/certificates".into(), None, vec![]),
        ("GET", "/v1/cluster".into(), None, vec![]),
        ("GET", "/v1/usage".into(), None, vec![]),
        ("GET", "/v1/usage?cursor=1".into(), None, vec![]),
        ("GET", "/v1/usage?cursor=x".into(), None, vec![]),
        ("GET", "/v1/state".into(), None, vec![]),
        ("PUT", "/v1/state".into(), Some(json!({"sandboxes": [sb]}).to_string()), vec![]),
        ("PUT", "/v1/state".into(), Some("{bad".into()), vec![]),
        ("PUT", "/v1/state".into(), Some(r#"{"sandboxes":[{"id":"a"}]}"#.into()), vec![]),
        ("PUT", "/v1/state".into(), Some("{}".into()), vec![("If-Match", "\"1\"".into())]),
        ("PUT", "/v1/state".into(), Some("{}".into()), vec![("Content-Type", "text/plain".into())]),
        ("PUT", "/v1/state".into(), Some(format!(r#"{{"x":"{}"}}"#, "y".repeat(3000))), vec![]),
        ("PUT", "/v1/sandboxes/abc12345".into(), Some(r#"{"id":"abc12345","workspace":"ws_1","address":"10.0.0.1"}"#.into()), vec![]),
        ("POST", "/v1/state/ops".into(), Some(json!({"ops": [{"op": "upsert", "kind": "deployment", "value": dep}]}).to_string()), vec![]),
        ("POST", "/v1/state/ops".into(), Some(json!({"ops": [{"op": "delete", "kind": "sandbox", "id": "nope"}]}).to_string()), vec![]),
        ("GET", "/v1/sandboxes/apibox".into(), None, vec![]),
        ("GET", "/v1/workspaces/ws_1".into(), None, vec![]),
        ("GET", "/v1/deployments/dep_api".into(), None, vec![]),
        ("GET", "/v1/share-tokens/nope".into(), None, vec![]),
        ("PUT", "/v1/sandboxes/apibox".into(), Some(sb.to_string()), vec![]),
        ("POST", "/v1/deployments/dep_api/activate".into(), Some(r#"{"version":"v2"}"#.into()), vec![]),
        ("POST", "/v1/deployments/dep_api/activate".into(), Some(r#"{"version":"v9"}"#.into()), vec![]),
        ("POST", "/v1/deployments/dep_1/activate".into(), Some(r#"{"version":"v1"}"#.into()), vec![]),
        ("POST", "/v1/domains/verify".into(), Some(r#"{"host":"nobody.example","kind":"custom"}"#.into()), vec![]),
        ("POST", "/v1/domains/verify".into(), Some(r#"{"host":"x","kind":"custom"}"#.into()), vec![]),
        ("DELETE", "/v1/sandboxes/apibox".into(), None, vec![]),
        ("DELETE", "/v1/sandboxes/apibox".into(), None, vec![]),
        ("DELETE", "/v1/sandboxes/abc12345".into(), None, vec![]),
    ];
    let mut exercised = BTreeSet::new();
    let mut errors = Vec::new();
    for (method, path, body, headers) in &calls {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = edge.api_with(method, path, body.as_deref(), &hs).await;
        match spec.check(method, path, &r) {
            Ok(op) => {
                exercised.insert(op);
            }
            Err(e) => errors.push(e),
        }
    }
    // Without a token: 401 is documented wherever it can happen.
    let r = raw_request(edge.control, "GET /v1/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    if let Err(e) = spec.check("GET", "/v1/state", &r) {
        errors.push(e);
    }
    assert!(errors.is_empty(), "responses that drift from docs/control-api.yaml:\n{}", errors.join("\n"));
    let missing: Vec<_> = spec.operations().difference(&exercised).cloned().collect();
    assert!(missing.is_empty(), "documented but never exercised: {missing:?}");
}

#[test]
fn the_served_document_is_the_file() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/control-api.yaml")).expect("spec");
    assert_eq!(text, miosa_edge::control::OPENAPI_YAML);
}
