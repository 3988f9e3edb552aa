//! The snapshot: the API part of the state at one generation, in `<state_dir>/state.snap`.
//! Written to a temp file, fsynced, renamed; read at start before the log records that
//! follow it.
//!
//! ```text
//! "MIOSA-SNAPSHOT 1\n" │ generation u64 LE │ frame: JSON {"workspaces","share_tokens","deployments","names"}
//!                      │ frame: sandboxes … │ … │ frame of length 0 (the end)
//! frame   = len u32 LE │ crc32 u32 LE │ payload
//! sandbox = id (u8 len, bytes) │ workspace (u32: index into "names") │ address (u8 4|16, bytes)
//!           │ state u8 │ previews (u8 n, then n × port u16 LE, access u8)
//! ```
//!
//! A million sandboxes are a million small binary records (about 30 bytes each), read
//! without making objects: a start spends its time checking and indexing them, not
//! parsing text. Everything else — a few thousand workspaces and deployments — is JSON
//! in the schema's own shape. Every frame is checksummed; a snapshot that fails its
//! checksum refuses the start with the file named (it replaced a good one atomically,
//! so a damaged one means a damaged disk, not a crash).
//!
//! Earlier versions kept the whole API state as `state.json` (`GET /v1/state`'s shape):
//! read when there is no `state.snap` yet, and replaced by one at the first fold.

use crate::schema::{Access, Bucket, Deployment, Port, Preview, SandboxState, ShareToken, StateDoc, Workspace};
use crate::state::{Objects, Origin};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

const MAGIC: &[u8] = b"MIOSA-SNAPSHOT 1\n";
/// Sandboxes per frame.
const CHUNK: usize = 4096;

/// The snapshot's file name in the state directory.
pub const FILE: &str = "state.snap";
/// The file earlier versions kept.
pub const LEGACY_FILE: &str = "state.json";

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    #[serde(default)]
    workspaces: Vec<Workspace>,
    #[serde(default)]
    share_tokens: Vec<ShareToken>,
    #[serde(default)]
    deployments: Vec<Deployment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    buckets: Vec<Bucket>,
    /// The workspace ids the sandboxes name (by index).
    #[serde(default)]
    names: Vec<String>,
}

/// A snapshot as read at start.
#[derive(Default)]
pub struct Snapshot {
    pub generation: u64,
    pub workspaces: Vec<Workspace>,
    pub share_tokens: Vec<ShareToken>,
    pub deployments: Vec<Deployment>,
    pub buckets: Vec<Bucket>,
    /// The workspace ids sandboxes name, by index.
    pub names: Vec<String>,
    /// Sandboxes, still encoded (see [`Snapshot::sandboxes`]).
    frames: Vec<u8>,
    /// Sandboxes of a legacy `state.json`.
    legacy: Vec<crate::schema::Sandbox>,
}

/// One sandbox of a snapshot, borrowed from it.
#[derive(Debug)]
pub struct SandboxRef<'a> {
    pub id: &'a str,
    /// The workspace's id.
    pub workspace: &'a str,
    /// Its index in the snapshot's list of workspace names (`None` for a legacy file).
    pub workspace_index: Option<usize>,
    pub address: IpAddr,
    pub state: SandboxState,
    pub previews: &'a [Preview],
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The next frame of `bytes` from `at`: its payload and where the next one starts.
fn next_frame(bytes: &[u8], at: usize) -> Result<(&[u8], usize), String> {
    let head = bytes.get(at..at + 8).ok_or("the file ends inside a frame header")?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let payload = bytes.get(at + 8..at + 8 + len).ok_or("the file ends inside a frame")?;
    if crc32fast::hash(payload) != crc {
        return Err(format!("the frame at byte {at} fails its checksum"));
    }
    Ok((payload, at + 8 + len))
}

impl Snapshot {
    /// Reads the snapshot of `dir`: `state.snap`, else a legacy `state.json`, else none.
    pub fn read(dir: &Path) -> Result<Snapshot, String> {
        match std::fs::read(dir.join(FILE)) {
            Ok(bytes) => return Snapshot::parse(bytes).map_err(|e| format!("{}: {e}", dir.join(FILE).display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", dir.join(FILE).display())),
        }
        let legacy = dir.join(LEGACY_FILE);
        match std::fs::read(&legacy) {
            Ok(bytes) => {
                let doc: StateDoc =
                    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a valid state file: {e}", legacy.display()))?;
                let s = doc.state;
                Ok(Snapshot {
                    generation: doc.generation.unwrap_or(0),
                    workspaces: s.workspaces,
                    share_tokens: s.share_tokens,
                    deployments: s.deployments,
                    buckets: s.buckets,
                    legacy: s.sandboxes,
                    ..Snapshot::default()
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
            Err(e) => Err(format!("cannot read {}: {e}", legacy.display())),
        }
    }

    /// Reads a snapshot from its bytes (every frame's checksum checked).
    pub fn decode(bytes: Vec<u8>) -> Result<Snapshot, String> {
        Snapshot::parse(bytes)
    }

    /// The snapshot as a state document (its sandboxes decoded into objects, each
    /// checked as the schema checks it).
    pub fn into_state(self) -> Result<crate::schema::State, String> {
        let mut sandboxes = Vec::with_capacity(self.sandbox_hint());
        self.sandboxes(
            |i, s| {
                sandboxes.push(crate::schema::Sandbox {
                    id: s.id.try_into().map_err(|e| format!("sandbox record {i}: {e}"))?,
                    workspace: s.workspace.try_into().map_err(|e| format!("sandbox record {i}: {e}"))?,
                    address: crate::schema::Address(s.address),
                    state: s.state,
                    previews: s.previews.to_vec(),
                });
                Ok(())
            },
            |e| e,
        )?;
        Ok(crate::schema::State {
            workspaces: self.workspaces,
            sandboxes,
            share_tokens: self.share_tokens,
            deployments: self.deployments,
            buckets: self.buckets,
        })
    }

    fn parse(bytes: Vec<u8>) -> Result<Snapshot, String> {
        let rest = bytes.strip_prefix(MAGIC).ok_or("not a miosa-edge snapshot")?;
        let generation = u64::from_le_bytes(rest.get(..8).ok_or("no generation")?.try_into().map_err(|_| "no generation")?);
        let at = MAGIC.len() + 8;
        let (head, at) = next_frame(&bytes, at)?;
        let head: Head = serde_json::from_slice(head).map_err(|e| format!("the head does not parse: {e}"))?;
        // Check every sandbox frame now; decoding them later cannot fail on a checksum.
        let mut end = at;
        loop {
            let (payload, next) = next_frame(&bytes, end)?;
            end = next;
            if payload.is_empty() {
                break;
            }
        }
        let frames = bytes[at..end].to_vec();
        Ok(Snapshot {
            generation,
            workspaces: head.workspaces,
            share_tokens: head.share_tokens,
            deployments: head.deployments,
            buckets: head.buckets,
            names: head.names,
            frames,
            legacy: Vec::new(),
        })
    }

    /// How many sandboxes it holds (an upper bound before decoding).
    pub fn sandbox_hint(&self) -> usize {
        self.legacy.len() + self.frames.len() / 24
    }

    /// Calls `f` with every sandbox, in order; stops at the first error (of `f`, or of a
    /// record that does not decode, made by `bad`).
    pub fn sandboxes<E>(&self, mut f: impl FnMut(usize, SandboxRef<'_>) -> Result<(), E>, bad: impl Fn(String) -> E) -> Result<(), E> {
        for (i, s) in self.legacy.iter().enumerate() {
            f(
                i,
                SandboxRef {
                    id: s.id.as_str(),
                    workspace: s.workspace.as_str(),
                    workspace_index: None,
                    address: s.address.0,
                    state: s.state,
                    previews: &s.previews,
                },
            )?;
        }
        let mut at = 0;
        let mut i = 0;
        let mut previews: Vec<Preview> = Vec::with_capacity(8);
        while at < self.frames.len() {
            let (payload, next) = next_frame(&self.frames, at).map_err(&bad)?;
            at = next;
            let mut p = payload;
            while !p.is_empty() {
                let rec = decode(&mut p, &mut previews).ok_or_else(|| bad(format!("sandbox record {i} does not decode")))?;
                let Some(workspace) = self.names.get(rec.workspace) else {
                    return Err(bad(format!("sandbox record {i} names workspace index {}", rec.workspace)));
                };
                f(
                    i,
                    SandboxRef {
                        id: rec.id,
                        workspace,
                        workspace_index: Some(rec.workspace),
                        address: rec.address,
                        state: rec.state,
                        previews: &previews,
                    },
                )?;
                i += 1;
            }
        }
        Ok(())
    }
}

struct Decoded<'a> {
    id: &'a str,
    workspace: usize,
    address: IpAddr,
    state: SandboxState,
}

fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (a, b) = (p.get(..n)?, p.get(n..)?);
    *p = b;
    Some(a)
}

fn decode<'a>(p: &mut &'a [u8], previews: &mut Vec<Preview>) -> Option<Decoded<'a>> {
    let n = *take(p, 1)?.first()? as usize;
    let id = std::str::from_utf8(take(p, n)?).ok()?;
    let workspace = u32::from_le_bytes(take(p, 4)?.try_into().ok()?) as usize;
    let address = match *take(p, 1)?.first()? {
        4 => IpAddr::from(<[u8; 4]>::try_from(take(p, 4)?).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(take(p, 16)?).ok()?),
        _ => return None,
    };
    let state = match *take(p, 1)?.first()? {
        0 => SandboxState::Running,
        1 => SandboxState::Suspended,
        _ => return None,
    };
    let count = *take(p, 1)?.first()? as usize;
    previews.clear();
    for _ in 0..count {
        let b = take(p, 3)?;
        let port = u16::from_le_bytes([b[0], b[1]]);
        let access = match b[2] {
            0 => Access::Private,
            1 => Access::Public,
            _ => return None,
        };
        previews.push(Preview { port: Port(port), access });
    }
    Some(Decoded { id, workspace, address, state })
}

/// Writes the API part of `objects` at `generation` to `path`, durably.
pub fn write(path: &Path, generation: u64, objects: &Objects) -> std::io::Result<()> {
    write_bytes(path, &encode(generation, objects)?)
}

/// The API part of `objects` at `generation`, encoded.
pub fn encode(generation: u64, objects: &Objects) -> std::io::Result<Vec<u8>> {
    let api = |o: Origin| o == Origin::Api;
    let mut names: Vec<String> = Vec::new();
    let mut name_of: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut head = Head {
        workspaces: objects.workspaces.iter().filter(|r| api(r.origin)).map(|r| (*r.obj).clone()).collect(),
        share_tokens: objects.share_tokens.iter().filter(|r| api(r.origin)).map(|r| (*r.obj).clone()).collect(),
        deployments: objects.deployments.iter().filter(|r| api(r.origin)).map(|r| (*r.obj).clone()).collect(),
        buckets: objects.buckets.iter().filter(|r| api(r.origin)).map(|r| (*r.obj).clone()).collect(),
        names: Vec::new(),
    };
    let mut body = Vec::with_capacity(objects.sandboxes.len() * 32 + 64);
    let mut chunk = Vec::with_capacity(CHUNK * 32);
    let mut in_chunk = 0;
    for r in objects.sandboxes.iter().filter(|r| api(r.origin)) {
        let Some(ws) = objects.workspace_ids.get(r.workspace) else { continue };
        let idx = *name_of.entry(r.workspace).or_insert_with(|| {
            names.push(ws.to_string());
            (names.len() - 1) as u32
        });
        let id = r.id().as_bytes();
        chunk.push(id.len() as u8);
        chunk.extend_from_slice(id);
        chunk.extend_from_slice(&idx.to_le_bytes());
        match r.address {
            IpAddr::V4(a) => {
                chunk.push(4);
                chunk.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                chunk.push(16);
                chunk.extend_from_slice(&a.octets());
            }
        }
        chunk.push(u8::from(r.state == SandboxState::Suspended));
        let previews: Vec<(u16, Access)> = r.previews().collect();
        chunk.push(previews.len().min(255) as u8);
        for (port, access) in previews.into_iter().take(255) {
            chunk.extend_from_slice(&port.to_le_bytes());
            chunk.push(u8::from(access == Access::Public));
        }
        in_chunk += 1;
        if in_chunk == CHUNK {
            frame(&mut body, &chunk);
            chunk.clear();
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        frame(&mut body, &chunk);
    }
    frame(&mut body, &[]);
    head.names = names;
    let mut out = Vec::with_capacity(body.len() + 4096);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    frame(&mut out, &serde_json::to_vec(&head).map_err(std::io::Error::other)?);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes an encoded snapshot to `path`, durably (temp file, fsync, rename).
pub fn write_bytes(path: &Path, out: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(".state.snap.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(out)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    crate::files::sync_dir(dir);
    // The state now lives here: a legacy file would only mislead.
    let _ = std::fs::remove_file(dir.join(LEGACY_FILE));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::State;
    use crate::state::Index;

    #[test]
    fn a_snapshot_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let doc: State = serde_json::from_str(
            r#"{"workspaces":[{"id":"w","slug":"w"}],
                "buckets":[{"id":"bk","workspace":"w","bucket":"proj_1-up","alias":"p","public":true,
                            "domains":[{"host":"files.example.com","verified":true}]}],
                "sandboxes":[{"id":"a","workspace":"w","address":"10.0.0.1","previews":[{"port":3000,"access":"public"},{"port":5173}]},
                             {"id":"b","workspace":"w","address":"::1","state":"suspended"}]}"#,
        )
        .unwrap();
        let index = Index::build(crate::schema::Domains::default(), &State::default(), &doc).unwrap();
        write(&dir.path().join(FILE), 42, index.objects()).unwrap();
        let snap = Snapshot::read(dir.path()).unwrap();
        assert_eq!((snap.generation, snap.workspaces.len()), (42, 1));
        assert_eq!(snap.buckets, doc.buckets, "buckets ride in the head");
        let mut seen = Vec::new();
        snap.sandboxes(
            |_, s| {
                seen.push((s.id.to_string(), s.workspace.to_string(), s.address.to_string(), s.state, s.previews.to_vec()));
                Ok::<(), String>(())
            },
            |e| e,
        )
        .unwrap();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(seen[0].4, doc.sandboxes[0].previews);
        assert_eq!((seen[1].2.as_str(), seen[1].3), ("::1", SandboxState::Suspended));
        // A flipped byte anywhere past the magic is caught.
        let path = dir.path().join(FILE);
        let good = std::fs::read(&path).unwrap();
        for at in [MAGIC.len() + 9, good.len() - 12, good.len() / 2] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            assert!(Snapshot::read(dir.path()).is_err(), "flip at {at}");
        }
    }
}
