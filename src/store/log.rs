//! The write-ahead log of the routing state: every acknowledged write, in order.
//!
//! ```text
//! <state_dir>/state.json          snapshot: the API state at generation S (temp + fsync + rename)
//! <state_dir>/state.log.<G>       older segments, folded into a snapshot of G, then removed
//! <state_dir>/state.log           the current segment
//! record = len u32 LE │ crc32 u32 LE (of the payload) │ payload: {"g":N,"ops":[…]}
//! ```
//!
//! A record's ops are the control API's own (`{"op":"upsert","kind":"sandbox","value":{…}}`,
//! `{"op":"delete","kind":"share_token","id":"…"}`) and `g` its generation: the stream of
//! ops another node could apply in order (fleet mode replicates it). A record without
//! ops marks a generation taken by a TOML reload.
//!
//! Reading back stops at the first record that is short, fails its checksum, does not
//! parse, or does not follow its predecessor's generation: everything from there on is a
//! torn tail (a crash in the middle of a write), dropped with a log line and cut off the
//! file so the next record lands after the last good one. A start never fails on it.

use crate::schema::{Kind, Object};
use crate::state::Op;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest record read back: a bigger length is a torn or foreign file.
const MAX_RECORD: u32 = 1 << 30;

/// One record: the ops of one write and the generation it made.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub generation: u64,
    pub ops: Vec<Op>,
}

/// An op as written: `{"op":"upsert","kind":…,"value":{…}}` or
/// `{"op":"delete","kind":…,"id":…}` (the control API's own shape).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum WireOp<'a> {
    Upsert { kind: KindName, value: ValueRef<'a> },
    Delete { kind: KindName, id: &'a str },
}

/// An object serialised in place (no JSON tree in between).
#[derive(Serialize)]
#[serde(untagged)]
enum ValueRef<'a> {
    Workspace(&'a crate::schema::Workspace),
    Sandbox(&'a crate::schema::Sandbox),
    ShareToken(&'a crate::schema::ShareToken),
    Deployment(&'a crate::schema::Deployment),
    Bucket(&'a crate::schema::Bucket),
}

#[derive(Serialize)]
struct WireRecord<'a> {
    g: u64,
    ops: Vec<WireOp<'a>>,
}

/// A record as read: ops decoded straight into typed objects (a start replays a
/// hundred thousand records; no JSON tree in between when `kind` comes before `value`,
/// as the writer puts it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadRecord {
    g: u64,
    #[serde(default)]
    ops: Vec<ReadOp>,
}

struct ReadOp(Op);

/// Reads an object of a kind known beforehand.
struct ObjectOf(Kind);

impl<'de> serde::de::DeserializeSeed<'de> for ObjectOf {
    type Value = Object;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Object, D::Error> {
        use crate::schema::{Bucket, Deployment, Sandbox, ShareToken, Workspace};
        Ok(match self.0 {
            Kind::Workspace => Object::Workspace(Workspace::deserialize(d)?),
            Kind::Sandbox => Object::Sandbox(Sandbox::deserialize(d)?),
            Kind::ShareToken => Object::ShareToken(ShareToken::deserialize(d)?),
            Kind::Deployment => Object::Deployment(Deployment::deserialize(d)?),
            Kind::Bucket => Object::Bucket(Bucket::deserialize(d)?),
        })
    }
}

impl<'de> Deserialize<'de> for ReadOp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReadOp, D::Error> {
        use serde::de::{Error, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ReadOp;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an op")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReadOp, A::Error> {
                let (mut op, mut kind, mut id) = (None::<String>, None::<Kind>, None::<String>);
                let (mut typed, mut raw) = (None::<Object>, None::<serde_json::Value>);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "op" => op = Some(map.next_value()?),
                        "kind" => kind = Some(map.next_value::<KindName>()?.0),
                        "id" => id = Some(map.next_value()?),
                        "value" => match kind {
                            Some(k) => typed = Some(map.next_value_seed(ObjectOf(k))?),
                            None => raw = Some(map.next_value()?),
                        },
                        other => return Err(A::Error::unknown_field(other, &["op", "kind", "id", "value"])),
                    }
                }
                let kind = kind.ok_or_else(|| A::Error::missing_field("kind"))?;
                match op.as_deref() {
                    Some("upsert") => {
                        let o = match (typed, raw) {
                            (Some(o), _) => o,
                            (None, Some(v)) => Object::from_value(kind, v).map_err(A::Error::custom)?,
                            (None, None) => return Err(A::Error::missing_field("value")),
                        };
                        if o.kind() != kind {
                            return Err(A::Error::custom("the value is not of its kind"));
                        }
                        Ok(ReadOp(Op::Upsert(o)))
                    }
                    Some("delete") => Ok(ReadOp(Op::Delete(kind, id.ok_or_else(|| A::Error::missing_field("id"))?))),
                    _ => Err(A::Error::custom("`op` must be upsert or delete")),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// A kind by its ops name (`share_token`).
#[derive(Clone, Copy)]
struct KindName(Kind);

impl Serialize for KindName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for KindName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KindName, D::Error> {
        Kind::deserialize(d).map(KindName)
    }
}

/// The framed record of generation `g` with `ops` (kind, id, new object or `None` for a
/// delete).
pub fn frame<'a>(g: u64, ops: impl Iterator<Item = (Kind, &'a str, Option<&'a Object>)>) -> Vec<u8> {
    let ops = ops
        .map(|(kind, id, new)| match new {
            Some(o) => WireOp::Upsert {
                kind: KindName(kind),
                value: match o {
                    Object::Workspace(w) => ValueRef::Workspace(w),
                    Object::Sandbox(s) => ValueRef::Sandbox(s),
                    Object::ShareToken(t) => ValueRef::ShareToken(t),
                    Object::Deployment(d) => ValueRef::Deployment(d),
                    Object::Bucket(b) => ValueRef::Bucket(b),
                },
            },
            None => WireOp::Delete { kind: KindName(kind), id },
        })
        .collect::<Vec<_>>();
    // The payload is written in place behind room for the head, which is filled in
    // after: a record of a whole-table PUT is tens of megabytes, and serializing it
    // apart and copying it behind the head took a second buffer of that size (and,
    // grown by doubling from nothing, several). The guess covers a sandbox's record;
    // capacity not written to costs no memory.
    let mut out = Vec::with_capacity(HEAD + 256 * ops.len() + 64);
    out.extend_from_slice(&[0; HEAD]);
    if serde_json::to_writer(&mut out, &WireRecord { g, ops }).is_err() {
        // Not reachable with these types (string keys only); an empty payload as before.
        out.truncate(HEAD);
    }
    let len = (out.len() - HEAD) as u32;
    let crc = crc32fast::hash(&out[HEAD..]);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..HEAD].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A frame's head: the payload's length and CRC-32, little-endian.
const HEAD: usize = 8;

impl Record {
    /// Reads a payload back.
    pub fn decode(payload: &[u8]) -> Result<Record, String> {
        let r: ReadRecord = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        Ok(Record { generation: r.g, ops: r.ops.into_iter().map(|o| o.0).collect() })
    }

    /// The record framed for the file: length, checksum, payload.
    pub fn frame(&self) -> Vec<u8> {
        frame(
            self.generation,
            self.ops.iter().map(|op| match op {
                Op::Upsert(o) => (o.kind(), o.id(), Some(o)),
                Op::Delete(k, id) => (*k, id.as_str(), None),
            }),
        )
    }
}

/// What reading a segment found.
#[derive(Debug, Default)]
pub struct Segment {
    pub records: Vec<Record>,
    /// Bytes of good records (the file is cut there when it had a torn tail).
    pub good_len: u64,
    /// Why reading stopped early, if it did.
    pub torn: Option<String>,
}

/// Reads every good record of `bytes`, expecting generations to follow `after` (the
/// generation the records before this segment reached; `None`: any first one).
pub fn parse(bytes: &[u8], mut after: Option<u64>) -> Segment {
    let mut seg = Segment::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let torn = |why: String| Some(format!("at byte {at}: {why}"));
        let Some(head) = bytes.get(at..at + HEAD) else {
            seg.torn = torn("a record header cut short".into());
            break;
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD {
            seg.torn = torn(format!("a record length of {len} bytes"));
            break;
        }
        let Some(payload) = bytes.get(at + HEAD..at + HEAD + len as usize) else {
            seg.torn = torn("a record cut short".into());
            break;
        };
        if crc32fast::hash(payload) != crc {
            seg.torn = torn("a record whose checksum does not match".into());
            break;
        }
        let record = match Record::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                seg.torn = torn(format!("a record that does not parse: {e}"));
                break;
            }
        };
        if let Some(prev) = after {
            if record.generation != prev + 1 {
                seg.torn = torn(format!("generation {} after {prev}", record.generation));
                break;
            }
        }
        after = Some(record.generation);
        at += HEAD + len as usize;
        seg.good_len = at as u64;
        seg.records.push(record);
    }
    seg
}

/// The segments of the log in `dir`, oldest first: `state.log.<G>` by G, then `state.log`.
pub fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut old: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(g) = name.strip_prefix("state.log.").and_then(|g| g.parse::<u64>().ok()) {
            old.push((g, e.path()));
        }
    }
    old.sort();
    let mut out: Vec<PathBuf> = old.into_iter().map(|(_, p)| p).collect();
    let current = dir.join("state.log");
    if current.exists() {
        out.push(current);
    }
    Ok(out)
}

/// Reads a whole segment file.
pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Cuts `path` to `len` bytes (a torn tail) and makes that durable.
pub fn truncate(path: &Path, len: u64) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

/// The current segment, open for appending.
#[derive(Debug)]
pub struct Writer {
    file: std::sync::Arc<File>,
    path: PathBuf,
    /// Bytes and records in the current segment.
    pub bytes: u64,
    pub records: u64,
}

impl Writer {
    /// Opens (or creates) `dir/state.log` for appending.
    pub fn open(dir: &Path) -> std::io::Result<Writer> {
        let path = dir.join("state.log");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let bytes = file.metadata()?.len();
        sync_dir(dir);
        Ok(Writer { file: std::sync::Arc::new(file), path, bytes, records: 0 })
    }

    /// Appends a framed record (written to the file, not yet durable: see [`Self::file`]).
    pub fn append(&mut self, framed: &[u8]) -> std::io::Result<()> {
        (&*self.file).write_all(framed)?;
        self.bytes += framed.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// The file, for `sync_data` by whoever makes the appended records durable.
    pub fn file(&self) -> std::sync::Arc<File> {
        self.file.clone()
    }

    /// Moves the current segment aside as `state.log.<generation>` (durable first) and
    /// starts a new one; returns the old segment's path.
    pub fn rotate(&mut self, generation: u64) -> std::io::Result<PathBuf> {
        self.file.sync_data()?;
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let aside = dir.join(format!("state.log.{generation}"));
        std::fs::rename(&self.path, &aside)?;
        let fresh = Writer::open(&dir)?;
        *self = fresh;
        Ok(aside)
    }
}

pub use crate::files::sync_dir;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Sandbox, State};

    fn record(g: u64) -> Record {
        let s: Sandbox = serde_json::from_str(&format!(r#"{{"id":"s{g}","workspace":"w","address":"10.0.0.{g}"}}"#)).unwrap();
        let b: crate::schema::Bucket =
            serde_json::from_str(r#"{"id":"bk","workspace":"w","bucket":"b-1","alias":"b","public":true}"#).unwrap();
        Record {
            generation: g,
            ops: vec![
                Op::Upsert(Object::Sandbox(s)),
                Op::Delete(Kind::ShareToken, "sh".into()),
                Op::Upsert(Object::Bucket(b)),
                Op::Delete(Kind::Bucket, "bk2".into()),
            ],
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_or_corrupt_tail_is_cut() {
        let mut bytes = Vec::new();
        for g in 1..=3 {
            bytes.extend(record(g).frame());
        }
        let full = parse(&bytes, None);
        assert_eq!(full.records, vec![record(1), record(2), record(3)]);
        assert!(full.torn.is_none());
        assert_eq!(full.good_len, bytes.len() as u64);
        // Every cut inside the last record drops exactly that record.
        let two = record(1).frame().len() + record(2).frame().len();
        for cut in two + 1..bytes.len() {
            let s = parse(&bytes[..cut], None);
            assert_eq!((s.records.len(), s.good_len), (2, two as u64), "cut at {cut}");
            assert!(s.torn.is_some());
        }
        // A flipped byte anywhere in a record stops the reading there.
        for at in [0usize, 5, 9, two + 12] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let s = parse(&bad, None);
            assert!(s.records.len() < 3 && s.torn.is_some(), "flip at {at}");
        }
        // Generations must follow each other.
        let mut gap = record(1).frame();
        gap.extend(record(3).frame());
        assert_eq!(parse(&gap, None).records.len(), 1);
        assert_eq!(parse(&bytes, Some(5)).records.len(), 0, "a segment must follow what came before");
        let _ = State::default();
    }
}
