//! The validated state in memory: every object by kind and id, in copy-on-write maps.
//!
//! Sandboxes, a million of them, are kept in one compact form ([`SandboxRecord`]: the
//! id inline, the workspace as a slot, the ports inline) that is at once the state's
//! only copy and what the route table reads: the table holds the same map. The other
//! kinds keep their schema objects (behind `Arc`s, so a copy of the whole state is a
//! handful of reference counts: `GET /v1/state` and the snapshot writer serialise a copy
//! without holding up writers).

use crate::cow::{CowMap, CowSlab, Key, Keyed};
use crate::schema::{
    Access, Address, Bucket, Deployment, Kind, Object, Port, Preview, Sandbox, SandboxId, SandboxState, ShareToken, State, Workspace,
    WorkspaceId,
};
use std::net::IpAddr;
use std::sync::Arc;

/// Where an object comes from: the operators' TOML file or the control API. Each part
/// owns its objects; the other may not overwrite or delete them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    Toml,
    Api,
}

/// Preview ports of a sandbox in the order given; up to five inline (more behind a
/// thin pointer, so a record stays within 64 bytes).
#[derive(Clone, Debug)]
enum Ports {
    Inline {
        len: u8,
        ports: [u16; 5],
        public: u8,
    },
    #[allow(clippy::box_collection)]
    Heap(Box<Vec<(u16, Access)>>),
}

impl Ports {
    fn new(previews: &[Preview]) -> Ports {
        if previews.len() <= 5 {
            let mut ports = [0u16; 5];
            let mut public = 0u8;
            for (i, p) in previews.iter().enumerate() {
                ports[i] = p.port.0;
                if p.access == Access::Public {
                    public |= 1 << i;
                }
            }
            Ports::Inline { len: previews.len() as u8, ports, public }
        } else {
            Ports::Heap(Box::new(previews.iter().map(|p| (p.port.0, p.access)).collect()))
        }
    }

    fn get(&self, i: usize) -> Option<(u16, Access)> {
        match self {
            Ports::Inline { len, ports, public } => {
                (i < *len as usize).then(|| (ports[i], if public >> i & 1 == 1 { Access::Public } else { Access::Private }))
            }
            Ports::Heap(p) => p.get(i).copied(),
        }
    }
}

/// A sandbox as the state keeps it (and the route table reads it).
#[derive(Clone, Debug)]
pub struct SandboxRecord {
    id: Key,
    pub address: IpAddr,
    /// The slot of its workspace ([`Objects::workspace_ids`]).
    pub workspace: u32,
    pub state: SandboxState,
    pub origin: Origin,
    previews: Ports,
}

impl Keyed for SandboxRecord {
    fn key(&self) -> &[u8] {
        self.id.as_bytes()
    }
}

impl SandboxRecord {
    /// The record of `s`, whose workspace is in `workspace_slot`.
    pub fn new(s: &Sandbox, workspace_slot: u32, origin: Origin) -> SandboxRecord {
        SandboxRecord::from_parts(s.id.as_str(), s.address.0, workspace_slot, s.state, &s.previews, origin)
    }

    /// The record of a sandbox given by its parts.
    pub fn from_parts(
        id: &str,
        address: IpAddr,
        workspace_slot: u32,
        state: SandboxState,
        previews: &[Preview],
        origin: Origin,
    ) -> SandboxRecord {
        SandboxRecord { id: Key::from(id), address, workspace: workspace_slot, state, origin, previews: Ports::new(previews) }
    }

    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The previewed ports and their access, in the order given.
    pub fn previews(&self) -> impl Iterator<Item = (u16, Access)> + '_ {
        (0..).map_while(|i| self.previews.get(i))
    }

    /// The access of a previewed port, `None` if the port is not a preview.
    #[inline]
    pub fn preview(&self, port: u16) -> Option<Access> {
        match &self.previews {
            Ports::Inline { len, ports, public } => ports[..*len as usize].iter().position(|p| *p == port).map(|i| {
                if public >> i & 1 == 1 {
                    Access::Public
                } else {
                    Access::Private
                }
            }),
            Ports::Heap(p) => p.iter().find(|e| e.0 == port).map(|e| e.1),
        }
    }

    /// The schema object, its workspace named `workspace`.
    pub fn to_schema(&self, workspace: &WorkspaceId) -> Sandbox {
        Sandbox {
            id: SandboxId::try_from(self.id()).unwrap_or_else(|_| unreachable_id(self.id())),
            workspace: workspace.clone(),
            address: Address(self.address),
            state: self.state,
            previews: self.previews().map(|(port, access)| Preview { port: Port(port), access }).collect(),
        }
    }
}

/// Records are only ever made from valid schema objects.
#[cold]
fn unreachable_id(id: &str) -> SandboxId {
    tracing::error!(id, "a stored sandbox id no longer parses");
    SandboxId::try_from("invalid").unwrap_or_else(|_| unreachable!("a constant id parses"))
}

macro_rules! record {
    ($(#[$m:meta])* $name:ident, $obj:ty $(, $slot:ident)?) => {
        $(#[$m])*
        #[derive(Clone, Debug)]
        pub struct $name {
            pub obj: Arc<$obj>,
            pub origin: Origin,
            $(
                /// Its stable slot (what other objects and the table refer to it by).
                pub $slot: u32,
            )?
        }

        impl Keyed for $name {
            fn key(&self) -> &[u8] {
                self.obj.id.as_str().as_bytes()
            }
        }
    };
}

record!(
    /// A workspace and its slot.
    WorkspaceRec, Workspace, slot
);
record!(
    /// A share-token record.
    ShareRec, ShareToken
);
record!(
    /// A deployment and its slot.
    DeploymentRec, Deployment, slot
);
record!(
    /// A storage bucket.
    BucketRec, Bucket
);

/// Every object of the validated state. Cloning is a few reference counts.
#[derive(Clone, Default, Debug)]
pub struct Objects {
    pub workspaces: CowMap<WorkspaceRec>,
    pub sandboxes: CowMap<SandboxRecord>,
    pub share_tokens: CowMap<ShareRec>,
    pub deployments: CowMap<DeploymentRec>,
    pub buckets: CowMap<BucketRec>,
    /// Workspace ids by slot: sandboxes name their workspace by slot.
    pub workspace_ids: CowSlab<WorkspaceId>,
}

impl Objects {
    /// The object of `kind` with `id`, and where it comes from.
    pub fn get(&self, kind: Kind, id: &str) -> Option<(Origin, Object)> {
        let k = id.as_bytes();
        match kind {
            Kind::Workspace => self.workspaces.get(k).map(|r| (r.origin, Object::Workspace((*r.obj).clone()))),
            Kind::Sandbox => self.sandboxes.get(k).and_then(|r| Some((r.origin, Object::Sandbox(self.sandbox(r)?)))),
            Kind::ShareToken => self.share_tokens.get(k).map(|r| (r.origin, Object::ShareToken((*r.obj).clone()))),
            Kind::Deployment => self.deployments.get(k).map(|r| (r.origin, Object::Deployment((*r.obj).clone()))),
            Kind::Bucket => self.buckets.get(k).map(|r| (r.origin, Object::Bucket((*r.obj).clone()))),
        }
    }

    /// Where the object of `kind` with `id` comes from, if it exists.
    pub fn origin(&self, kind: Kind, id: &str) -> Option<Origin> {
        let k = id.as_bytes();
        match kind {
            Kind::Workspace => self.workspaces.get(k).map(|r| r.origin),
            Kind::Sandbox => self.sandboxes.get(k).map(|r| r.origin),
            Kind::ShareToken => self.share_tokens.get(k).map(|r| r.origin),
            Kind::Deployment => self.deployments.get(k).map(|r| r.origin),
            Kind::Bucket => self.buckets.get(k).map(|r| r.origin),
        }
    }

    /// The schema object of a sandbox record.
    pub fn sandbox(&self, r: &SandboxRecord) -> Option<Sandbox> {
        self.workspace_ids.get(r.workspace).map(|w| r.to_schema(w))
    }

    /// The objects of one part as a state document, each kind sorted by id.
    pub fn to_state(&self, origin: Origin) -> State {
        fn of<R, T: Clone>(map: &CowMap<R>, origin: Origin, part: impl Fn(&R) -> (Origin, &Arc<T>), id: impl Fn(&T) -> &str) -> Vec<T>
        where
            R: Keyed,
        {
            let mut v: Vec<T> = map.iter().filter(|r| part(r).0 == origin).map(|r| T::clone(part(r).1)).collect();
            v.sort_by(|a, b| id(a).cmp(id(b)));
            v
        }
        let mut sandboxes: Vec<Sandbox> = self.sandboxes.iter().filter(|r| r.origin == origin).filter_map(|r| self.sandbox(r)).collect();
        sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
        State {
            workspaces: of(&self.workspaces, origin, |r| (r.origin, &r.obj), |w| w.id.as_str()),
            sandboxes,
            share_tokens: of(&self.share_tokens, origin, |r| (r.origin, &r.obj), |t| t.id.as_str()),
            deployments: of(&self.deployments, origin, |r| (r.origin, &r.obj), |d| d.id.as_str()),
            buckets: of(&self.buckets, origin, |r| (r.origin, &r.obj), |b| b.id.as_str()),
        }
    }

    /// How many objects of `kind` there are (both parts).
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Workspace => self.workspaces.len(),
            Kind::Sandbox => self.sandboxes.len(),
            Kind::ShareToken => self.share_tokens.len(),
            Kind::Deployment => self.deployments.len(),
            Kind::Bucket => self.buckets.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_records_keep_ports_in_order_and_round_trip() {
        let json = r#"{"id":"abc","workspace":"ws_1","address":"10.0.0.1","state":"suspended",
            "previews":[{"port":5173,"access":"public"},{"port":3000},{"port":8080,"access":"public"}]}"#;
        let s: Sandbox = serde_json::from_str(json).unwrap();
        let r = SandboxRecord::new(&s, 7, Origin::Api);
        assert_eq!(r.preview(3000), Some(Access::Private));
        assert_eq!(r.preview(8080), Some(Access::Public));
        assert_eq!(r.preview(1), None);
        assert_eq!(r.to_schema(&s.workspace), s);
        let many: Vec<Preview> = (1..=7).map(|p| Preview { port: Port(p), access: Access::Public }).collect();
        let s2 = Sandbox { previews: many, ..s.clone() };
        let r2 = SandboxRecord::new(&s2, 0, Origin::Toml);
        assert_eq!(r2.to_schema(&s2.workspace), s2);
        assert_eq!(r2.preview(7), Some(Access::Public));
        assert!(std::mem::size_of::<SandboxRecord>() <= 64, "{}", std::mem::size_of::<SandboxRecord>());
    }
}
