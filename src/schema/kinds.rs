//! The kinds of object of the routing state, named once: their names in documents
//! (`share_tokens`), in ops (`share_token`), in API paths (`share-tokens`) and in
//! messages (`share token`); one typed object of any kind; a whole-state document.

use super::{Bucket, Deployment, Identified, Sandbox, ShareToken, State, Workspace};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// A kind of object of the routing state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `workspaces`
    Workspace,
    /// `sandboxes`
    Sandbox,
    /// `share_tokens`
    ShareToken,
    /// `deployments`
    Deployment,
    /// `buckets`
    Bucket,
}

impl Kind {
    /// Every kind, in document order (references point to earlier kinds).
    pub const ALL: [Kind; 5] = [Kind::Workspace, Kind::Sandbox, Kind::ShareToken, Kind::Deployment, Kind::Bucket];

    /// The key of its list in a state document (`share_tokens`).
    pub fn field(self) -> &'static str {
        match self {
            Kind::Workspace => "workspaces",
            Kind::Sandbox => "sandboxes",
            Kind::ShareToken => "share_tokens",
            Kind::Deployment => "deployments",
            Kind::Bucket => "buckets",
        }
    }

    /// Its name in ops (`"kind": "share_token"`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Workspace => "workspace",
            Kind::Sandbox => "sandbox",
            Kind::ShareToken => "share_token",
            Kind::Deployment => "deployment",
            Kind::Bucket => "bucket",
        }
    }

    /// The collection segment of its API paths (`/v1/share-tokens/{id}`).
    pub fn path(self) -> &'static str {
        match self {
            Kind::Workspace => "workspaces",
            Kind::Sandbox => "sandboxes",
            Kind::ShareToken => "share-tokens",
            Kind::Deployment => "deployments",
            Kind::Bucket => "buckets",
        }
    }

    /// Its name in messages (`share token`).
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Workspace => "workspace",
            Kind::Sandbox => "sandbox",
            Kind::ShareToken => "share token",
            Kind::Deployment => "deployment",
            Kind::Bucket => "bucket",
        }
    }

    /// The kind whose document key is `field`.
    pub fn from_field(field: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.field() == field)
    }

    /// The kind named `name` in ops.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind whose API collection is `segment`.
    pub fn from_path(segment: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.path() == segment)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Kind, D::Error> {
        let s = String::deserialize(d)?;
        Kind::from_name(&s)
            .ok_or_else(|| de::Error::custom(format!("unknown kind `{s}`, expected workspace, sandbox, share_token, deployment or bucket")))
    }
}

/// One object of any kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A workspace.
    Workspace(Workspace),
    /// A sandbox.
    Sandbox(Sandbox),
    /// A share-token record.
    ShareToken(ShareToken),
    /// A deployment.
    Deployment(Deployment),
    /// A storage bucket.
    Bucket(Bucket),
}

impl Object {
    /// Reads an object of `kind`, structs from JSON objects only (the error says where in
    /// `value` it went wrong).
    pub fn from_value(kind: Kind, value: serde_json::Value) -> Result<Object, serde_path_to_error::Error<serde_json::Error>> {
        let v = super::strict::Strict(value);
        Ok(match kind {
            Kind::Workspace => Object::Workspace(serde_path_to_error::deserialize(v)?),
            Kind::Sandbox => Object::Sandbox(serde_path_to_error::deserialize(v)?),
            Kind::ShareToken => Object::ShareToken(serde_path_to_error::deserialize(v)?),
            Kind::Deployment => Object::Deployment(serde_path_to_error::deserialize(v)?),
            Kind::Bucket => Object::Bucket(serde_path_to_error::deserialize(v)?),
        })
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Workspace(_) => Kind::Workspace,
            Object::Sandbox(_) => Kind::Sandbox,
            Object::ShareToken(_) => Kind::ShareToken,
            Object::Deployment(_) => Kind::Deployment,
            Object::Bucket(_) => Kind::Bucket,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        match self {
            Object::Workspace(o) => o.id_str(),
            Object::Sandbox(o) => o.id_str(),
            Object::ShareToken(o) => o.id_str(),
            Object::Deployment(o) => o.id_str(),
            Object::Bucket(o) => o.id_str(),
        }
    }

    /// The object as JSON.
    pub fn to_value(&self) -> serde_json::Value {
        let v = match self {
            Object::Workspace(o) => serde_json::to_value(o),
            Object::Sandbox(o) => serde_json::to_value(o),
            Object::ShareToken(o) => serde_json::to_value(o),
            Object::Deployment(o) => serde_json::to_value(o),
            Object::Bucket(o) => serde_json::to_value(o),
        };
        v.unwrap_or_default()
    }
}

impl State {
    /// The object of `kind` with `id`.
    pub fn get(&self, kind: Kind, id: &str) -> Option<Object> {
        fn find<T: Identified + Clone>(v: &[T], id: &str) -> Option<T> {
            v.iter().find(|o| o.id_str() == id).cloned()
        }
        match kind {
            Kind::Workspace => find(&self.workspaces, id).map(Object::Workspace),
            Kind::Sandbox => find(&self.sandboxes, id).map(Object::Sandbox),
            Kind::ShareToken => find(&self.share_tokens, id).map(Object::ShareToken),
            Kind::Deployment => find(&self.deployments, id).map(Object::Deployment),
            Kind::Bucket => find(&self.buckets, id).map(Object::Bucket),
        }
    }

    /// Whether an object of `kind` has `id`.
    pub fn contains(&self, kind: Kind, id: &str) -> bool {
        self.ids(kind).any(|i| i == id)
    }

    /// The ids of the objects of `kind`, in document order.
    pub fn ids(&self, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
        match kind {
            Kind::Workspace => Box::new(self.workspaces.iter().map(Identified::id_str)),
            Kind::Sandbox => Box::new(self.sandboxes.iter().map(Identified::id_str)),
            Kind::ShareToken => Box::new(self.share_tokens.iter().map(Identified::id_str)),
            Kind::Deployment => Box::new(self.deployments.iter().map(Identified::id_str)),
            Kind::Bucket => Box::new(self.buckets.iter().map(Identified::id_str)),
        }
    }

    /// How many objects of `kind` there are.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Workspace => self.workspaces.len(),
            Kind::Sandbox => self.sandboxes.len(),
            Kind::ShareToken => self.share_tokens.len(),
            Kind::Deployment => self.deployments.len(),
            Kind::Bucket => self.buckets.len(),
        }
    }

    /// Removes the object of `kind` with `id`; true if there was one.
    pub fn remove(&mut self, kind: Kind, id: &str) -> bool {
        fn remove<T: Identified>(v: &mut Vec<T>, id: &str) -> bool {
            let n = v.len();
            v.retain(|o| o.id_str() != id);
            v.len() != n
        }
        match kind {
            Kind::Workspace => remove(&mut self.workspaces, id),
            Kind::Sandbox => remove(&mut self.sandboxes, id),
            Kind::ShareToken => remove(&mut self.share_tokens, id),
            Kind::Deployment => remove(&mut self.deployments, id),
            Kind::Bucket => remove(&mut self.buckets, id),
        }
    }

    /// Replaces the object with the same kind and id, or appends it.
    pub fn upsert(&mut self, object: Object) {
        fn upsert<T: Identified>(v: &mut Vec<T>, o: T) {
            match v.iter_mut().find(|x| x.id_str() == o.id_str()) {
                Some(slot) => *slot = o,
                None => v.push(o),
            }
        }
        match object {
            Object::Workspace(o) => upsert(&mut self.workspaces, o),
            Object::Sandbox(o) => upsert(&mut self.sandboxes, o),
            Object::ShareToken(o) => upsert(&mut self.share_tokens, o),
            Object::Deployment(o) => upsert(&mut self.deployments, o),
            Object::Bucket(o) => upsert(&mut self.buckets, o),
        }
    }
}

/// A whole state as the control API takes it (`PUT /v1/state`): the lists of every kind
/// and, optionally, the `generation` the writer saw (an `If-Match` in the body). Unknown
/// keys are refused, like everywhere in the schema.
#[derive(Debug, Default)]
pub struct StateDoc {
    /// The generation the writer last saw (compared like `If-Match`).
    pub generation: Option<u64>,
    /// The objects.
    pub state: State,
}

impl<'de> Deserialize<'de> for StateDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StateDoc, D::Error> {
        const FIELDS: &[&str] = &["generation", "workspaces", "sandboxes", "share_tokens", "deployments", "buckets"];
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StateDoc;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a routing state object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StateDoc, A::Error> {
                let mut doc = StateDoc::default();
                let mut seen = [false; 6];
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = FIELDS.iter().position(|f| *f == key).ok_or_else(|| de::Error::unknown_field(&key, FIELDS))?;
                    if std::mem::replace(&mut seen[slot], true) {
                        return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    match Kind::from_field(&key) {
                        None => doc.generation = Some(map.next_value()?),
                        Some(Kind::Workspace) => doc.state.workspaces = map.next_value()?,
                        Some(Kind::Sandbox) => doc.state.sandboxes = map.next_value()?,
                        Some(Kind::ShareToken) => doc.state.share_tokens = map.next_value()?,
                        Some(Kind::Deployment) => doc.state.deployments = map.next_value()?,
                        Some(Kind::Bucket) => doc.state.buckets = map.next_value()?,
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_named_once_and_found_by_every_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_field(k.field()), Some(k));
            assert_eq!(Kind::from_name(k.name()), Some(k));
            assert_eq!(Kind::from_path(k.path()), Some(k));
        }
        assert_eq!(Kind::from_path("share_tokens"), None, "paths use a hyphen");
        let doc: StateDoc = serde_json::from_str(r#"{"generation":7,"sandboxes":[]}"#).expect("doc");
        assert_eq!(doc.generation, Some(7));
        let err = serde_json::from_str::<StateDoc>(r#"{"sandboxes":[],"colour":1}"#).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        let err = serde_json::from_str::<StateDoc>(r#"{"sandboxes":[],"sandboxes":[]}"#).expect_err("duplicate");
        assert!(err.to_string().contains("duplicate field"), "{err}");
    }
}
