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
        let is = |t: &str| match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => true,
        };
        match &s["type"] {
            Value::String(t) if !is(t) => return Err(format!("{at}: expected {t}")),
            Value::Array(ts) if !ts.iter().any(|t| is(t.as_str().unwrap_or_default())) => {
                return Err(format!("{at}: expected one of {ts:?}"))
            }
            _ => {}
        }
        if let Some(alts) = s["oneOf"].as_array() {
            let fits: Vec<Result<(), String>> = alts.iter().map(|a| self.validate(a, v, at)).collect();
            match fits.iter().filter(|r| r.is_ok()).count() {
                1 => {}
                0 => return Err(format!("{at}: fits none of oneOf: {:?}", fits.into_iter().filter_map(Result::err).collect::<Vec<_>>())),
                n => return Err(format!("{at}: fits {n} alternatives of oneOf")),
            }
        }
        if let Some(n) = v.as_i64() {
            if s["minimum"].as_i64().is_some_and(|m| n < m) || s["maximum"].as_i64().is_some_and(|m| n > m) {
                return Err(format!("{at}: {n} out of [{}, {}]", s["minimum"], s["maximum"]));
            }
        }
        if let Some(t) = v.as_str() {
            let len = t.chars().count() as u64;
            if s["minLength"].as_u64().is_some_and(|m| len < m) || s["maxLength"].as_u64().is_some_and(|m| len > m) {
                return Err(format!("{at}: length {len} out of [{}, {}]", s["minLength"], s["maxLength"]));
            }
        }
        if let Some(a) = v.as_array() {
            if s["minItems"].as_u64().is_some_and(|m| (a.len() as u64) < m) {
                return Err(format!("{at}: fewer than {} items", s["minItems"]));
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

#[test]
fn the_schemas_refuse_what_the_edge_refuses() {
    let spec = Spec::load();
    let schema = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let fits = |name: &str, v: &Value| spec.validate(&schema(name), v, "$");

    let sandbox = json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "state": "suspended", "previews": [{"port": 5173, "access": "public"}]});
    assert_eq!(fits("Sandbox", &sandbox), Ok(()));
    for bad in [
        json!({"id": "abc", "workspace": "ws_1"}),
        json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "colour": "red"}),
        json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "state": "asleep"}),
        json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "previews": [{"port": 0}]}),
        json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "previews": [{"port": 70000}]}),
        json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "previews": [[5173]]}),
        json!({"id": "abc", "workspace": "ws_1", "address": "10.0.0.1", "previews": [{"port": 80, "access": "open"}]}),
        json!({"id": "a".repeat(58), "workspace": "ws_1", "address": "10.0.0.1"}),
        json!(["abc", "ws_1", "10.0.0.1"]),
    ] {
        assert!(fits("Sandbox", &bad).is_err(), "the schema takes {bad}");
    }

    // A release is one kind or the other, never a mix.
    for good in [
        json!({"kind": "dynamic", "instances": ["10.0.0.1:80"], "balance": "round_robin", "health_check": {"path": "/healthz", "interval_ms": 1000}}),
        json!({"kind": "static", "sha256": "a".repeat(64), "spa": true}),
    ] {
        assert_eq!(fits("Release", &good), Ok(()), "{good}");
    }
    for bad in [
        json!({"kind": "dynamic", "instances": []}),
        json!({"kind": "dynamic", "instances": ["10.0.0.1:80"], "spa": true}),
        json!({"kind": "static", "sha256": "a".repeat(64), "instances": ["10.0.0.1:80"]}),
        json!({"kind": "lambda"}),
        json!({"kind": "dynamic", "instances": ["10.0.0.1:80"], "balance": "random"}),
        json!({"kind": "dynamic", "instances": ["10.0.0.1:80"], "health_check": {"path": "/", "interval_ms": 50}}),
    ] {
        assert!(fits("Release", &bad).is_err(), "the schema takes {bad}");
    }

    // One object of a kind, exactly.
    assert_eq!(fits("Object", &sandbox), Ok(()));
    assert_eq!(fits("Object", &json!({"id": "ws_1", "slug": "s", "branding": {"accent_color": "#0a84ff"}})), Ok(()));
    assert!(fits("Object", &json!({"id": "x"})).is_err());
    assert!(fits("Workspace", &json!({"id": "ws_1", "slug": "s", "preview_domain": {"host": "p.example.com", "verified": true, "x": 1}}))
        .is_err());
    let cert = json!({"names": ["a.test"], "issuer": "ca", "not_before": "2026-01-01T00:00:00Z", "not_after": "2026-04-01T00:00:00Z",
        "renew_after": "2026-03-01T00:00:00Z", "source": "file", "entry": "a.test", "last_error": null});
    assert_eq!(fits("Certificate", &cert), Ok(()));
    let mut bad = cert.clone();
    bad["source"] = json!("a.test");
    assert!(fits("Certificate", &bad).is_err());
}
