//! `lb-agent uninstall`: removes the pin folder, which detaches every program (the pinned
//! links alone hold them) and frees the maps.

use std::path::Path;

use anyhow::{Context, Result};

use crate::datapath::pins::LINKS_DIR;

/// Removes everything pinned at `pin`; says what it removed.
pub fn run(pin: &Path) -> Result<()> {
    if !pin.exists() {
        println!("nothing pinned at {}", pin.display());
        return Ok(());
    }
    let links = std::fs::read_dir(pin.join(LINKS_DIR)).map_or(0, Iterator::count);
    std::fs::remove_dir_all(pin).with_context(|| format!("removing {}", pin.display()))?;
    println!(
        "removed {} ({links} links detached, programs and maps unpinned)",
        pin.display()
    );
    Ok(())
}
