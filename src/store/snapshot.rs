//! The snapshot: the API part of the state at one generation, in `<state_dir>/state.json`
//! (`{"generation": N, "workspaces": […], …}`: the shape of `GET /v1/state`, and of the
//! file earlier versions kept). Written to a temp file, fsynced, renamed; read at start
//! before the log records that follow it.

use crate::schema::{State, StateDoc};
use crate::state::{Objects, Origin};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Reads `path`: the generation and the state (`(0, empty)` when there is no file).
pub fn read(path: &Path) -> Result<(u64, State), String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, State::default())),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let doc: StateDoc = serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a valid state file: {e}", path.display()))?;
    Ok((doc.generation.unwrap_or(0), doc.state))
}

/// Writes the API part of `objects` at `generation` to `path`, durably.
pub fn write(path: &Path, generation: u64, objects: &Objects) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct Out<'a> {
        generation: u64,
        #[serde(flatten)]
        state: &'a State,
    }
    let state = objects.to_state(Origin::Api);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(".state.json.tmp");
    {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
        serde_json::to_writer(&mut w, &Out { generation, state: &state }).map_err(std::io::Error::other)?;
        w.flush()?;
        drop(w);
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    super::log::sync_dir(dir);
    Ok(())
}
