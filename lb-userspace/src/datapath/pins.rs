//! What lives under the pin path (a folder on a bpffs), and the one place its names are
//! spelled:
//!
//! * `<MAP NAME>` for each map (`lb_common::map_names`);
//! * `prog_<program>` for each attached program (`prog_lb_xdp`, `prog_lb_tc_reject`,
//!   `prog_lb_tc_pod`, `prog_lb_tc_ext`, `prog_lb_tc_egress`);
//! * `links/<kind>-<ifindex>` per attached interface: `xdp` + `reject` on an external
//!   interface in XDP, `tcext` on one in TC, `tcpod` on a pod's, and `egress` on both;
//!   `links/sock-<program>-<pid>`
//!   for the socket hooks. The pins alone hold the links: removing one detaches its program;
//! * `layout-<version>`, an empty folder that says how the maps are laid out.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::error::{refuse, Context, Result};
use aya::{
    maps::MapData,
    programs::{SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
use lb_common::program_names;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The folder of the pinned links.
pub const LINKS_DIR: &str = "links";

/// The pin of an attached program.
pub fn program_pin(pin: &Path, program: &str) -> PathBuf {
    pin.join(format!("prog_{program}"))
}

/// Where a program is pinned while a new agent loads it, before it takes the usual name.
pub fn program_pin_new(pin: &Path, program: &str) -> PathBuf {
    pin.join(format!("prog_{program}_new"))
}

/// What a pinned link attaches; its file name starts with the kind's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkKind {
    /// `lb_xdp` on an external interface.
    Xdp,
    /// `lb_tc_reject`, TC ingress beside `lb_xdp`.
    Reject,
    /// `lb_tc_ext`, TC ingress of an external interface.
    TcExt,
    /// `lb_tc_pod`, TC ingress of a pod interface.
    TcPod,
    /// `lb_tc_egress`, TC egress of a pod or external interface.
    Egress,
    /// A cgroup socket hook: `sock-<program>-<agent pid>`.
    Sock,
}

impl LinkKind {
    const ALL: [LinkKind; 6] = [
        LinkKind::Xdp,
        LinkKind::Reject,
        LinkKind::TcExt,
        LinkKind::TcPod,
        LinkKind::Egress,
        LinkKind::Sock,
    ];

    fn prefix(self) -> &'static str {
        match self {
            LinkKind::Xdp => "xdp",
            LinkKind::Reject => "reject",
            LinkKind::TcExt => "tcext",
            LinkKind::TcPod => "tcpod",
            LinkKind::Egress => "egress",
            LinkKind::Sock => "sock",
        }
    }

    /// The link's kind, and for an interface's link its ifindex, from its file name.
    pub fn parse(name: &str) -> Option<(LinkKind, Option<u32>)> {
        let (prefix, rest) = name.split_once('-')?;
        let kind = Self::ALL.into_iter().find(|k| k.prefix() == prefix)?;
        match kind {
            LinkKind::Sock => Some((kind, None)),
            _ => rest.parse().ok().map(|i| (kind, Some(i))),
        }
    }

    /// How `lb-agent status` names the hook.
    pub fn hook(self) -> &'static str {
        match self {
            LinkKind::Xdp => "XDP",
            LinkKind::Reject => "TC ingress (rejects)",
            LinkKind::TcExt => "TC ingress",
            LinkKind::TcPod => "TC ingress (pod)",
            LinkKind::Egress => "TC egress (reverse NAT)",
            LinkKind::Sock => "cgroup socket hooks",
        }
    }
}

/// The pin of an interface's link of `kind`.
pub fn link_path(pin: &Path, kind: LinkKind, ifindex: u32) -> PathBuf {
    pin.join(LINKS_DIR)
        .join(format!("{}-{ifindex}", kind.prefix()))
}

/// The pin of a socket hook's link, per agent process.
pub fn sock_link_path(pin: &Path, program: &str) -> PathBuf {
    pin.join(LINKS_DIR).join(format!(
        "{}-{program}-{}",
        LinkKind::Sock.prefix(),
        std::process::id()
    ))
}

/// Earlier agents pinned `lb_tc_reject` as `prog_lb_tc` and its links as `tc-<ifindex>`:
/// renamed to today's names, so that an upgrade takes them over like any other.
pub fn rename_legacy(pin: &Path) -> Result<()> {
    let old = pin.join("prog_lb_tc");
    if old.exists() {
        let new = program_pin(pin, program_names::LB_TC_REJECT);
        fs::rename(&old, &new)
            .with_context(|| format!("renaming {} to {}", old.display(), new.display()))?;
    }
    for entry in fs::read_dir(pin.join(LINKS_DIR))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(idx) = name.strip_prefix("tc-").and_then(|i| i.parse::<u32>().ok()) {
            let new = link_path(pin, LinkKind::Reject, idx);
            fs::rename(&path, &new)
                .with_context(|| format!("renaming {} to {}", path.display(), new.display()))?;
        }
    }
    Ok(())
}

/// Checks that `dir` (or the nearest existing parent) is on a bpffs.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let st =
        nix::sys::statfs::statfs(probe).with_context(|| format!("statfs {}", probe.display()))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        refuse!(
            "{} is not on a BPF filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)",
            dir.display()
        );
    }
    Ok(())
}

/// The layout of the pinned maps: bumped with any change to the types in `lb-common`. A
/// bpffs holds no regular files, so the mark is an empty directory `layout-<LAYOUT>`.
const LAYOUT: &str = "lb-maps-v2";

/// Refuses pinned maps of another layout (they would be misread), and marks new ones.
pub fn check_layout(pin: &Path) -> Result<()> {
    let mut marks = Vec::new();
    let mut others = false;
    for entry in fs::read_dir(pin)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        match name.strip_prefix("layout-") {
            Some(l) => marks.push(l.to_string()),
            None => others |= name != LINKS_DIR,
        }
    }
    match marks.as_slice() {
        [m] if m == LAYOUT => Ok(()),
        [] if !others => {
            let mark = pin.join(format!("layout-{LAYOUT}"));
            fs::create_dir(&mark).with_context(|| format!("creating {}", mark.display()))
        }
        [] => refuse!(
            "{} holds pins without a layout mark (not this project's, or an unversioned build): \
             remove them (`lb-agent uninstall --pin-path {}`) first",
            pin.display(),
            pin.display()
        ),
        found => refuse!(
            "the maps pinned at {} have layout {found:?}, this agent needs {LAYOUT:?}: drain \
             the node and run `lb-agent uninstall --pin-path {}` before starting this version",
            pin.display(),
            pin.display()
        ),
    }
}

/// Pins a program where a leftover of an interrupted start may be pinned.
pub fn replace_pin(
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<()> {
    let _ = fs::remove_file(path);
    pin(path).with_context(|| format!("pinning {}", path.display()))
}

/// Opens a pinned map by name.
pub fn open_map(pin: &Path, name: &str) -> Result<MapData> {
    let path = pin.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is an agent running with --pin-path {}?)",
            path.display(),
            pin.display()
        )
    })
}

/// The attached programs as pinned by a running (or stopped) agent.
pub struct PinnedPrograms {
    pub xdp: Xdp,
    pub tc_reject: SchedClassifier,
    pub tc_pod: SchedClassifier,
    pub tc_ext: SchedClassifier,
    pub tc_egress: SchedClassifier,
}

/// Opens the pinned programs.
pub fn pinned_programs(pin: &Path) -> Result<PinnedPrograms> {
    let xdp_path = program_pin(pin, program_names::LB_XDP);
    let xdp = Xdp::from_pin(&xdp_path, XdpAttachType::Interface).with_context(|| {
        format!(
            "opening {} (is an agent running with this --pin-path?)",
            xdp_path.display()
        )
    })?;
    let tc = |name: &str| {
        let path = program_pin(pin, name);
        SchedClassifier::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    Ok(PinnedPrograms {
        xdp,
        tc_reject: tc(program_names::LB_TC_REJECT)?,
        tc_pod: tc(program_names::LB_TC_POD)?,
        tc_ext: tc(program_names::LB_TC_EXT)?,
        tc_egress: tc(program_names::LB_TC_EGRESS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        for kind in [
            LinkKind::Xdp,
            LinkKind::Reject,
            LinkKind::TcExt,
            LinkKind::TcPod,
            LinkKind::Egress,
        ] {
            let path = link_path(Path::new("/p"), kind, 42);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            assert_eq!(LinkKind::parse(name), Some((kind, Some(42))), "{name}");
        }
        let sock = sock_link_path(Path::new("/p"), "lb_connect4");
        let name = sock.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert_eq!(LinkKind::parse(name), Some((LinkKind::Sock, None)));
        assert_eq!(LinkKind::parse("tc-3"), None);
        assert_eq!(LinkKind::parse("xdp-x"), None);
    }
}
