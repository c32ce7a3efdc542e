//! The kernel side through aya: loading the embedded object with its maps and program pinned
//! under the pin path, attaching to interfaces with pinned links (so the datapath outlives
//! the agent), and the pinned maps as `ServiceMaps`.
//!
//! Layout under the pin path: `<MAP NAME>` for each map, `prog_lb_xdp`, `prog_lb_tc`,
//! `prog_lb_tc_pod` and `prog_lb_tc_ext` for the programs, and per attached interface
//! `links/xdp-<ifindex>` + `links/tc-<ifindex>` (external, XDP), `links/tcext-<ifindex>`
//! (external, TC) or `links/tcpod-<ifindex>` (pod). The pins alone hold the links: removing
//! one detaches its program.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        HashMap, Map, MapData, PerCpuArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, TestRun,
        TestRunOptions, TestRunResult, Xdp, XdpMode,
    },
    EbpfLoader,
};
use aya_obj::programs::XdpAttachType;
use lb_common::{
    map_names, stat, BackendSlotKey, BackendStats, BackendV4, Clock, MemberKey, ServiceKeyV4,
    ServiceStats, ServiceV4, SourceRangeV4, CLOCK_PROGRAM, SOCK_PROGRAMS, TC_EXT_PROGRAM,
    TC_POD_PROGRAM, TC_PROGRAM, XDP_PROGRAM,
};

use crate::{
    clock,
    maps::{Capacity, MapError, ServiceMaps},
};

/// The BPF object, built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// Pinned links of the socket hooks: `links/sock-<program>-<agent pid>`.
const SOCK_LINK_PREFIX: &str = "sock-";
const XDP_PIN: &str = "prog_lb_xdp";
const TC_PIN: &str = "prog_lb_tc";
const TC_POD_PIN: &str = "prog_lb_tc_pod";
const TC_EXT_PIN: &str = "prog_lb_tc_ext";
const LINKS_DIR: &str = "links";

/// Checks that `dir` (or the nearest existing parent) is on a bpffs.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let st =
        nix::sys::statfs::statfs(probe).with_context(|| format!("statfs {}", probe.display()))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a BPF filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)",
            dir.display()
        );
    }
    Ok(())
}

/// Sizes of the maps, used when they are first created (pinned maps keep theirs).
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    /// `LB4_SERVICES` and `LB_SVC_STATS`.
    pub services: u32,
    /// `LB4_BACKENDS` and `LB_BE_STATS`.
    pub backends: u32,
    /// `LB_SLOTS` and `LB_MEMBERS`.
    pub slots: u32,
    pub conntrack: u32,
    pub snat: u32,
    /// Entries of `LB_MAGLEV`: table size × number of tables.
    pub maglev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: lb_common::DEFAULT_SERVICES,
            backends: lb_common::DEFAULT_BACKENDS,
            slots: lb_common::DEFAULT_BACKEND_SLOTS,
            conntrack: lb_common::DEFAULT_CONNTRACK_ENTRIES,
            snat: lb_common::DEFAULT_SNAT_ENTRIES,
            maglev: lb_common::DEFAULT_MAGLEV_SIZE * lb_common::DEFAULT_MAGLEV_TABLES,
        }
    }
}

/// The loaded (or taken over) programs.
/// How the datapath attaches to external interfaces (`--ext-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExtAttach {
    /// XDP where the driver runs it natively (a NIC, by its ethtool driver info, whose driver
    /// accepts a native attach), TC elsewhere: on a veth, bridge, bond or tunnel, XDP runs on
    /// skbs the kernel has built already (generic XDP, or on a veth an XDP frame made from
    /// each skb), so it saves nothing over TC (the bench measures both on a veth uplink).
    #[default]
    Auto,
    /// XDP everywhere (native where the driver has it, else the kernel's generic XDP).
    Xdp,
    /// TC ingress everywhere.
    Tc,
}

impl std::str::FromStr for ExtAttach {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "xdp" => Ok(Self::Xdp),
            "tc" => Ok(Self::Tc),
            _ => Err(format!("{s:?}: expected auto, xdp or tc")),
        }
    }
}

/// What `Datapath::attach` attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// `lb_tc_pod`, TC ingress of a pod interface.
    Pod,
    /// `lb_xdp` and `lb_tc_reject` on an external interface.
    Xdp,
    /// `lb_tc_ext`, TC ingress of an external interface.
    Tc,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pod => "TC ingress (pod)",
            Self::Xdp => "XDP",
            Self::Tc => "TC ingress",
        })
    }
}

pub struct Datapath {
    pin: PathBuf,
    xdp: Xdp,
    tc: SchedClassifier,
    /// The translation for pod interfaces (TC, where the skb's checksum state is known).
    tc_pod: SchedClassifier,
    /// The translation for external interfaces in TC.
    tc_ext: SchedClassifier,
    /// How external interfaces are attached.
    ext_attach: ExtAttach,
    /// The object, which holds the cgroup socket hooks (attached only by `attach_cgroup`).
    ebpf: aya::Ebpf,
    /// `LB_IFACES`: which interfaces lead to this node's pods.
    ifaces: HashMap<MapData, u32, u32>,
    /// Interfaces whose `LB_IFACES` entry this agent has written.
    marked: std::collections::HashSet<u32>,
    /// The programs were already pinned: a previous agent's datapath was taken over.
    pub taken_over: bool,
    /// The clock this agent wrote to `LB_CLOCK`.
    clock: Clock,
}

impl Datapath {
    /// Loads the object with the maps a previous agent pinned (if any) and this agent's own
    /// programs. A previous agent's links are moved to the new programs in place
    /// (`bpf_link_update`, atomic per interface), so an upgrade never detaches anything and
    /// conntrack, affinity and counters carry over. The datapath's clock (`LB_CLOCK`) is
    /// calibrated here (about 100 ms).
    pub fn load(pin: &Path, sizes: MapSizes) -> Result<Self> {
        ensure_bpffs(pin)?;
        fs::create_dir_all(pin.join(LINKS_DIR))
            .with_context(|| format!("creating {}", pin.display()))?;
        check_layout(pin)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin)
            .map_max_entries(map_names::SERVICES_V4, sizes.services)
            .map_max_entries(map_names::SERVICE_STATS, sizes.services)
            .map_max_entries(map_names::BACKENDS_V4, sizes.backends)
            .map_max_entries(map_names::BACKEND_STATS, sizes.backends)
            .map_max_entries(map_names::BACKEND_SLOTS, sizes.slots)
            .map_max_entries(map_names::MEMBERS, sizes.slots)
            .map_max_entries(map_names::CONNTRACK_V4, sizes.conntrack)
            .map_max_entries(map_names::SNAT_V4, sizes.snat)
            .map_max_entries(map_names::MAGLEV, sizes.maglev)
            .load(EBPF_OBJECT)
            .context("loading the BPF object")?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        let (xdp_path, tc_path, pod_path, ext_path) = (
            pin.join(XDP_PIN),
            pin.join(TC_PIN),
            pin.join(TC_POD_PIN),
            pin.join(TC_EXT_PIN),
        );
        let taken_over = xdp_path.exists() || tc_path.exists();
        // This agent's programs, pinned beside any older ones, then opened from there.
        let (xdp_new, tc_new, pod_new, ext_new) = (
            pin.join("prog_lb_xdp_new"),
            pin.join("prog_lb_tc_new"),
            pin.join("prog_lb_tc_pod_new"),
            pin.join("prog_lb_tc_ext_new"),
        );
        {
            let xdp: &mut Xdp = ebpf
                .program_mut(XDP_PROGRAM)
                .context("program lb_xdp missing from the object")?
                .try_into()?;
            xdp.load().context("loading lb_xdp (verifier)")?;
            replace_pin(&xdp_new, |p| xdp.pin(p))?;
        }
        let xdp = Xdp::from_pin(&xdp_new, XdpAttachType::Interface)
            .with_context(|| format!("opening {}", xdp_new.display()))?;
        let tc = load_classifier(&mut ebpf, TC_PROGRAM, &tc_new)?;
        let tc_pod = load_classifier(&mut ebpf, TC_POD_PROGRAM, &pod_new)?;
        let tc_ext = load_classifier(&mut ebpf, TC_EXT_PROGRAM, &ext_new)?;
        let ifaces = HashMap::try_from(Map::HashMap(open_map(pin, map_names::IFACES)?))?;
        let clock_prog: &mut Xdp = ebpf
            .program_mut(CLOCK_PROGRAM)
            .context("program lb_clock missing from the object")?
            .try_into()?;
        clock_prog.load().context("loading lb_clock (verifier)")?;
        // Without a calibration (zero) the programs read the coarse clock themselves.
        let clock = clock::calibrate(clock_prog).unwrap_or_else(|e| {
            tracing::warn!(
                error = format!("{e:#}"),
                "the datapath clock could not be calibrated; the programs read the kernel's \
                 coarse clock"
            );
            Clock::default()
        });
        write_clock(pin, &clock)?;
        let mut dp = Datapath {
            pin: pin.to_owned(),
            xdp,
            tc,
            tc_pod,
            tc_ext,
            ext_attach: ExtAttach::default(),
            ebpf,
            ifaces,
            marked: Default::default(),
            taken_over,
            clock,
        };
        dp.adopt_links()?;
        // The new programs take the usual names (the links hold them either way).
        for (from, to) in [
            (&xdp_new, &xdp_path),
            (&tc_new, &tc_path),
            (&pod_new, &pod_path),
            (&ext_new, &ext_path),
        ] {
            fs::rename(from, to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        }
        Ok(dp)
    }

    /// Sets how external interfaces are attached from now on.
    pub fn set_ext_attach(&mut self, mode: ExtAttach) {
        self.ext_attach = mode;
    }

    /// Moves every pinned link to this agent's programs (the pins go on holding them);
    /// forgets links that are gone.
    fn adopt_links(&mut self) -> Result<()> {
        for entry in fs::read_dir(self.pin.join(LINKS_DIR))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let fd: FdLink = match PinnedLink::from_pin(&path) {
                Ok(l) => l.into(),
                Err(e) => {
                    tracing::warn!(link = %name, error = %e, "unreadable pinned link; removed");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            if name.starts_with(SOCK_LINK_PREFIX) {
                // Replaced in attach_cgroup (or removed, when no --cgroup is given).
                continue;
            }
            // Each moved link is taken back from its program and closed: only the pin holds
            // it then, so that unpinning it detaches it (see `attach`).
            let moved: Result<()> = if name.starts_with("xdp-") {
                XdpLink::try_from(fd)
                    .map_err(anyhow::Error::from)
                    .and_then(|l| {
                        let id = self.xdp.attach_to_link(l)?;
                        drop(self.xdp.take_link(id)?);
                        Ok(())
                    })
            } else {
                let prog = if name.starts_with("tcpod-") {
                    &mut self.tc_pod
                } else if name.starts_with("tcext-") {
                    &mut self.tc_ext
                } else {
                    &mut self.tc
                };
                SchedClassifierLink::try_from(fd)
                    .map_err(anyhow::Error::from)
                    .and_then(|l| {
                        let id = prog.attach_to_link(l)?;
                        drop(prog.take_link(id)?);
                        Ok(())
                    })
            };
            if let Err(e) = moved {
                // A link whose interface went away while no agent ran.
                tracing::info!(link = %name, error = format!("{e:#}"), "stale pinned link removed");
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    fn link_path(&self, kind: &str, ifindex: u32) -> PathBuf {
        self.pin.join(LINKS_DIR).join(format!("{kind}-{ifindex}"))
    }

    /// Whether the interface's programs are attached and its kind is recorded.
    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.marked.contains(&ifindex)
            && (self.link_path("tcpod", ifindex).exists()
                || self.link_path("tcext", ifindex).exists()
                || (self.link_path("xdp", ifindex).exists()
                    && self.link_path("tc", ifindex).exists()))
    }

    /// The clock this agent wrote to `LB_CLOCK`.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Checks the datapath's clock (`LB_CLOCK` as it is) against the kernel's coarse clock
    /// and calibrates it again when the two are more than two ticks apart (they may be one
    /// apart at any reading), or when there is none yet. The new clock, if it was rewritten.
    pub fn check_clock(&mut self) -> Result<Option<Clock>> {
        let prog: &Xdp = self
            .ebpf
            .program(CLOCK_PROGRAM)
            .context("program lb_clock missing from the object")?
            .try_into()?;
        let current = read_clock(&self.pin)?;
        let now = clock::sample(prog)?;
        if current.ns_per_tick != 0
            && clock::drift(&current, now).unsigned_abs() <= 2 * current.ns_per_tick
        {
            return Ok(None);
        }
        let fresh = clock::calibrate(prog)?;
        write_clock(&self.pin, &fresh)?;
        self.clock = fresh;
        Ok(Some(fresh))
    }

    /// Writes one `LB_CONFIG` value.
    pub fn set_config(&mut self, index: u32, value: u32) -> Result<()> {
        let mut config: aya::maps::Array<MapData, u32> =
            aya::maps::Array::try_from(Map::Array(open_map(&self.pin, map_names::CONFIG)?))?;
        config.set(index, value, 0).context("writing LB_CONFIG")?;
        Ok(())
    }

    /// Records whether an interface leads to this node's pods (`LB_IFACES`).
    pub fn mark(&mut self, ifindex: u32, pod: bool) -> Result<()> {
        if pod {
            self.ifaces
                .insert(ifindex, lb_common::IFACE_F_POD, 0)
                .context("writing LB_IFACES")?;
        } else {
            let _ = self.ifaces.remove(&ifindex);
        }
        self.marked.insert(ifindex);
        Ok(())
    }

    /// Attaches the datapath to an interface with pinned links, skipping a program whose link
    /// is pinned already: on a pod interface `lb_tc_pod` (TC ingress); on an external one,
    /// as `ExtAttach` says, `lb_xdp` with `lb_tc_reject` (TC ingress first, so that what XDP
    /// hands on is answered) or `lb_tc_ext` alone. Links of the other kind on the interface
    /// (left by an agent with another `--ext-attach`) are unpinned, which detaches them,
    /// once the new ones are in. Returns what it attached now, if anything.
    pub fn attach(&mut self, ifindex: u32, ifname: &str, pod: bool) -> Result<Option<Attached>> {
        // The kind first: a packet from a pod must never be taken for an outside one.
        if !self.marked.contains(&ifindex) {
            self.mark(ifindex, pod)?;
        }
        if pod {
            let path = self.link_path("tcpod", ifindex);
            let now = attach_tcx(&mut self.tc_pod, ifname, &path)?;
            return Ok(now.then_some(Attached::Pod));
        }
        let (xdp_path, tc_path, ext_path) = (
            self.link_path("xdp", ifindex),
            self.link_path("tc", ifindex),
            self.link_path("tcext", ifindex),
        );
        let (kind, now) = match self.ext_attach {
            ExtAttach::Tc => (
                Attached::Tc,
                attach_tcx(&mut self.tc_ext, ifname, &ext_path)?,
            ),
            ExtAttach::Xdp => (
                Attached::Xdp,
                self.attach_xdp(ifindex, ifname, XdpMode::Default)?,
            ),
            ExtAttach::Auto => match crate::node::driver(ifname) {
                Ok(d) if d.is_hardware() => {
                    match self.attach_xdp(ifindex, ifname, XdpMode::Driver) {
                        Ok(now) => (Attached::Xdp, now),
                        Err(e) => {
                            tracing::info!(
                                iface = %ifname,
                                driver = %d.name,
                                error = format!("{e:#}"),
                                "no native XDP; attaching in TC instead"
                            );
                            (
                                Attached::Tc,
                                attach_tcx(&mut self.tc_ext, ifname, &ext_path)?,
                            )
                        }
                    }
                }
                // A software device (or one that does not say): TC.
                _ => (
                    Attached::Tc,
                    attach_tcx(&mut self.tc_ext, ifname, &ext_path)?,
                ),
            },
        };
        // The hooks of the other kind go, now that this kind is in place.
        let stale = match kind {
            Attached::Tc => vec![xdp_path, tc_path],
            _ => vec![ext_path],
        };
        for path in stale.iter().filter(|p| p.exists()) {
            fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
            tracing::info!(iface = %ifname, link = %path.display(), "detached (another kind of hook replaces it)");
        }
        Ok(now.then_some(kind))
    }

    /// Attaches `lb_tc_reject` (TC ingress) and then `lb_xdp` where their links are not pinned
    /// yet; whether it attached anything.
    fn attach_xdp(&mut self, ifindex: u32, ifname: &str, mode: XdpMode) -> Result<bool> {
        let tc_path = self.link_path("tc", ifindex);
        let mut attached = attach_tcx(&mut self.tc, ifname, &tc_path)?;
        let xdp_path = self.link_path("xdp", ifindex);
        if !xdp_path.exists() {
            let id = self
                .xdp
                .attach_to_if_index(ifindex, mode)
                .with_context(|| format!("attaching XDP ({mode:?} mode) to {ifname}"))?;
            let fd: FdLink =
                self.xdp.take_link(id)?.try_into().context(
                    "the kernel attached XDP without a BPF link, which cannot be pinned",
                )?;
            fd.pin(&xdp_path)
                .with_context(|| format!("pinning {}", xdp_path.display()))?;
            attached = true;
        }
        Ok(attached)
    }

    /// Attaches the socket hooks to a cgroup v2 directory with pinned links. A previous
    /// agent's hooks stay attached until this agent's are (both translate alike: the second
    /// sees a backend, not a frontend), then their links are unpinned, which detaches them.
    /// `None` detaches any hooks a previous agent left.
    pub fn attach_cgroup(&mut self, cgroup: Option<&Path>) -> Result<()> {
        let links = self.pin.join(LINKS_DIR);
        let old: Vec<PathBuf> = fs::read_dir(&links)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(SOCK_LINK_PREFIX))
            })
            .collect();
        let mut new = Vec::new();
        if let Some(dir) = cgroup {
            let fd = fs::File::open(dir)
                .with_context(|| format!("opening the cgroup {}", dir.display()))?;
            let st = nix::sys::statfs::fstatfs(&fd)
                .with_context(|| format!("statfs {}", dir.display()))?;
            if st.filesystem_type().0 as i64 != CGROUP2_MAGIC {
                bail!(
                    "--cgroup {}: not a cgroup v2 directory (find the cgroup2 mount in /proc/mounts)",
                    dir.display()
                );
            }
            for name in SOCK_PROGRAMS {
                let prog: &mut CgroupSockAddr = self
                    .ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing"))?
                    .try_into()?;
                let id = prog
                    // A BPF link: the kernel attaches it as one of many (flags must be 0).
                    .attach(&fd, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", dir.display()))?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                let path = links.join(format!("{SOCK_LINK_PREFIX}{name}-{}", std::process::id()));
                let _ = fs::remove_file(&path);
                link.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                new.push(path);
            }
        }
        for p in old.iter().filter(|p| !new.contains(p)) {
            fs::remove_file(p).with_context(|| format!("unpinning {}", p.display()))?;
        }
        Ok(())
    }

    /// Removes the pins of links whose interface is gone (the kernel detached them already).
    pub fn forget_links_except(&mut self, live: &[u32]) -> Result<Vec<u32>> {
        self.marked.retain(|i| live.contains(i));
        let mut gone = Vec::new();
        for entry in fs::read_dir(self.pin.join(LINKS_DIR))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(idx) = name
                .split_once('-')
                .and_then(|(_, i)| i.parse::<u32>().ok())
            else {
                continue;
            };
            if !live.contains(&idx) {
                fs::remove_file(entry.path())?;
                let _ = self.ifaces.remove(&idx);
                if !gone.contains(&idx) {
                    gone.push(idx);
                }
            }
        }
        Ok(gone)
    }

    /// The XDP program (for BPF_PROG_TEST_RUN).
    pub fn xdp(&self) -> &Xdp {
        &self.xdp
    }

    /// The TC program (for BPF_PROG_TEST_RUN).
    pub fn tc(&self) -> &SchedClassifier {
        &self.tc
    }

    /// The pod interfaces' program (for BPF_PROG_TEST_RUN).
    pub fn tc_pod(&self) -> &SchedClassifier {
        &self.tc_pod
    }

    /// The external interfaces' TC program (for BPF_PROG_TEST_RUN).
    pub fn tc_ext(&self) -> &SchedClassifier {
        &self.tc_ext
    }
}

fn clock_map(pin: &Path) -> Result<aya::maps::Array<MapData, Clock>> {
    Ok(aya::maps::Array::try_from(Map::Array(open_map(
        pin,
        map_names::CLOCK,
    )?))?)
}

/// Writes the datapath's clock (`LB_CLOCK[0]`).
fn write_clock(pin: &Path, clock: &Clock) -> Result<()> {
    clock_map(pin)?.set(0, clock, 0).context("writing LB_CLOCK")
}

/// The datapath's clock as pinned (`LB_CLOCK[0]`; a zero tick: not calibrated).
pub fn read_clock(pin: &Path) -> Result<Clock> {
    clock_map(pin)?.get(&0, 0).context("reading LB_CLOCK")
}

/// Loads the object's TC program `name` (verifier), pins it at `path` and opens it from there.
fn load_classifier(ebpf: &mut aya::Ebpf, name: &str, path: &Path) -> Result<SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("loading {name} (verifier)"))?;
    replace_pin(path, |p| prog.pin(p))?;
    SchedClassifier::from_pin(path).with_context(|| format!("opening {}", path.display()))
}

/// Attaches `prog` to TC ingress (tcx) of `ifname` with a link pinned at `path`, unless one is
/// pinned there already; whether it attached it now.
fn attach_tcx(prog: &mut SchedClassifier, ifname: &str, path: &Path) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let id = prog
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching TC ingress (tcx) to {ifname}"))?;
    let fd: FdLink = prog.take_link(id)?.try_into()?;
    fd.pin(path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(true)
}

/// The layout of the pinned maps: bumped with any change to the types in `lb-common`. A
/// bpffs holds no regular files, so the mark is an empty directory `layout-<LAYOUT>`.
const LAYOUT: &str = "lb-maps-v2";

/// Refuses pinned maps of another layout (they would be misread), and marks new ones.
fn check_layout(pin: &Path) -> Result<()> {
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
        [] => bail!(
            "{} holds pins without a layout mark (not this project's, or an unversioned build): \
             remove them (`lb-agent uninstall --pin-path {}`) first",
            pin.display(),
            pin.display()
        ),
        found => bail!(
            "the maps pinned at {} have layout {found:?}, this agent needs {LAYOUT:?}: drain \
             the node and run `lb-agent uninstall --pin-path {}` before starting this version",
            pin.display(),
            pin.display()
        ),
    }
}

/// Pins a program where a leftover of an interrupted start may be pinned.
fn replace_pin(
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<()> {
    let _ = fs::remove_file(path);
    pin(path).with_context(|| format!("pinning {}", path.display()))
}

/// Runs one frame through a program with BPF_PROG_TEST_RUN: (verdict, output frame). With
/// `ingress_ifindex`, an XDP program sees the frame as arriving on that interface.
pub fn run_frame<P>(prog: &P, frame: &[u8], ingress_ifindex: Option<u32>) -> Result<(u32, Vec<u8>)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; data_end must be the frame's length.
    let mut ctx = [0u8; 24];
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if let Some(i) = ingress_ifindex {
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&i.to_ne_bytes());
        opts.ctx_in = Some(&ctx);
    }
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// The programs as pinned by a running (or stopped) agent.
pub struct PinnedPrograms {
    pub xdp: Xdp,
    pub tc_reject: SchedClassifier,
    pub tc_pod: SchedClassifier,
    pub tc_ext: SchedClassifier,
}

/// Opens the pinned programs.
pub fn pinned_programs(pin: &Path) -> Result<PinnedPrograms> {
    let xdp_path = pin.join(XDP_PIN);
    let xdp = Xdp::from_pin(&xdp_path, XdpAttachType::Interface).with_context(|| {
        format!(
            "opening {} (is an agent running with this --pin-path?)",
            xdp_path.display()
        )
    })?;
    let tc = |name: &str| {
        let path = pin.join(name);
        SchedClassifier::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    Ok(PinnedPrograms {
        xdp,
        tc_reject: tc(TC_PIN)?,
        tc_pod: tc(TC_POD_PIN)?,
        tc_ext: tc(TC_EXT_PIN)?,
    })
}

pub(crate) fn open_map(pin: &Path, name: &str) -> Result<MapData> {
    let path = pin.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is an agent running with --pin-path {}?)",
            path.display(),
            pin.display()
        )
    })
}

/// `LB_MAGLEV`, written through a memory mapping (the map is `BPF_F_MMAPABLE`): a table is
/// compared and rewritten at memory speed instead of one syscall per entry. Only the pages of
/// the table being written are mapped, and only while it is written, so the agent's memory
/// does not include the whole array. The kernel lays array elements out 8 bytes apart (values
/// are rounded up to 8), so entry i is the u32 at byte 8·i.
struct MaglevMap {
    map: MapData,
    entries: usize,
    /// Entries of one table (`LB_CONFIG[MAGLEV_SIZE]`); 0 when the datapath has none.
    size: u32,
}

/// Bytes between array elements.
const MAGLEV_STRIDE: usize = 8;

impl MaglevMap {
    fn open(pin: &Path) -> Result<Self> {
        let map = open_map(pin, map_names::MAGLEV)?;
        let entries = map.info().context("LB_MAGLEV info")?.max_entries() as usize;
        let config: aya::maps::Array<MapData, u32> =
            aya::maps::Array::try_from(Map::Array(open_map(pin, map_names::CONFIG)?))?;
        let size = config.get(&lb_common::config::MAGLEV_SIZE, 0).unwrap_or(0);
        Ok(MaglevMap { map, entries, size })
    }

    fn tables(&self) -> u32 {
        if self.size == 0 {
            0
        } else {
            (self.entries / self.size as usize) as u32
        }
    }

    fn write(&mut self, index: u32, content: &[u32]) -> Result<usize, MapError> {
        let fail = |reason: String| MapError {
            map: map_names::MAGLEV,
            op: "update",
            reason,
        };
        if index >= self.tables() || content.len() != self.size as usize {
            return Err(fail(format!(
                "table {index} of {} entries does not fit",
                content.len()
            )));
        }
        let page = 4096;
        let start = index as usize * self.size as usize * MAGLEV_STRIDE;
        let end = start + content.len() * MAGLEV_STRIDE;
        let offset = start - start % page;
        let len = (end - offset).next_multiple_of(page);
        // SAFETY: a shared mapping of whole pages of the map (offset page-aligned, within the
        // array: end <= entries · 8 by the check above); unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&self.map.fd().as_fd()),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(fail(format!("mmap: {}", std::io::Error::last_os_error())));
        }
        let mut changed = 0;
        for (i, v) in content.iter().enumerate() {
            // SAFETY: start - offset + 8·i + 4 <= len: within the mapping; the element's first
            // 4 bytes are the value (little-endian, as the BPF target); aligned 4-byte
            // accesses, so a packet sees the old or the new id.
            unsafe {
                let slot = base
                    .cast::<u8>()
                    .add(start - offset + i * MAGLEV_STRIDE)
                    .cast::<u32>();
                if std::ptr::read_volatile(slot) != *v {
                    std::ptr::write_volatile(slot, *v);
                    changed += 1;
                }
            }
        }
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(base, len) };
        Ok(changed)
    }
}

// Batch operations on hash maps (kernel 5.6): many entries per syscall.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP: the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// One `bpf(cmd, attr)` call; the kernel writes `attr.count` back.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch`; the callers point its key, value and
    // token pointers at buffers of `count` entries of the map's own sizes, alive for the
    // call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(ENOTSUPP))
}

/// Every entry of the hash map behind `fd`, read by `BPF_MAP_LOOKUP_BATCH`; `None` when the
/// kernel has no batch lookups for it (the caller iterates instead). Entries that change
/// during the read may be seen in either state.
pub fn dump_batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<Option<Vec<(K, V)>>> {
    const BATCH: usize = 8192;
    let mut out = Vec::new();
    // SAFETY: `Pod` types are plain data, valid for any bytes (zeroes here).
    let (mut keys, mut values): (Vec<K>, Vec<V>) = unsafe {
        (
            vec![std::mem::zeroed(); BATCH],
            vec![std::mem::zeroed(); BATCH],
        )
    };
    // The resume token (a bucket index for hash maps), room for a key to be safe.
    let mut token_in = [0u64; 8];
    let mut token_out = [0u64; 8];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            ..Default::default()
        };
        let r = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(BATCH);
        match r {
            Ok(()) => {}
            // The end of the map: the last entries are in this batch.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                return Ok(Some(out));
            }
            Err(e) if first && unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        token_in = token_out;
        first = false;
    }
}

/// Deletes `keys` from the hash map behind `fd` by `BPF_MAP_DELETE_BATCH`; keys already gone
/// are skipped. `Ok(false)` when the kernel has no batch deletes (nothing was deleted).
pub fn delete_batch<K: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
) -> std::io::Result<bool> {
    let mut done = 0;
    while done < keys.len() {
        let rest = &keys[done..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            ..Default::default()
        };
        match batch_call(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => return Ok(true),
            // `count` were deleted, the next one was already gone: go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                done += attr.count as usize + 1;
            }
            Err(e) if done == 0 && attr.count == 0 && unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `entries` into the hash map behind `fd`, up to `BATCH` entries per syscall.
/// Returns `Ok(false)` when the kernel has no batch updates (nothing was written then): the
/// caller writes entry by entry.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    entries: &[(K, V)],
) -> std::io::Result<bool> {
    const BATCH: usize = 16_384;
    for (n, chunk) in entries.chunks(BATCH).enumerate() {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            ..Default::default()
        };
        if let Err(e) = batch_call(BPF_MAP_UPDATE_BATCH, &mut attr) {
            if n == 0 && attr.count == 0 && unsupported(&e) {
                return Ok(false);
            }
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "{e} (after {} of {} entries)",
                    n * BATCH + attr.count as usize,
                    entries.len()
                ),
            ));
        }
    }
    Ok(true)
}

/// The pinned service maps.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKeyV4, ServiceV4>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    backends: HashMap<MapData, u32, BackendV4>,
    members: HashMap<MapData, MemberKey, u32>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    maglev: MaglevMap,
    ranges: LpmTrie<MapData, SourceRangeV4, u8>,
    config: aya::maps::Array<MapData, u32>,
    capacity: Capacity,
}

/// The sizes the pinned service maps were made with.
pub fn read_capacity(pin: &Path) -> Result<Capacity> {
    let size = |name: &str| -> Result<u32> {
        Ok(open_map(pin, name)?
            .info()
            .with_context(|| format!("{name} info"))?
            .max_entries())
    };
    Ok(Capacity {
        services: size(map_names::SERVICES_V4)?.min(size(map_names::SERVICE_STATS)?),
        backends: size(map_names::BACKENDS_V4)?.min(size(map_names::BACKEND_STATS)?),
        slots: size(map_names::BACKEND_SLOTS)?.min(size(map_names::MEMBERS)?),
    })
}

impl PinnedMaps {
    pub fn open(pin: &Path) -> Result<Self> {
        Ok(PinnedMaps {
            capacity: read_capacity(pin)?,
            maglev: MaglevMap::open(pin)?,
            config: aya::maps::Array::try_from(Map::Array(open_map(pin, map_names::CONFIG)?))?,
            ranges: LpmTrie::try_from(Map::LpmTrie(open_map(pin, map_names::SOURCE_RANGES_V4)?))?,
            services: HashMap::try_from(Map::HashMap(open_map(pin, map_names::SERVICES_V4)?))?,
            slots: HashMap::try_from(Map::HashMap(open_map(pin, map_names::BACKEND_SLOTS)?))?,
            backends: HashMap::try_from(Map::HashMap(open_map(pin, map_names::BACKENDS_V4)?))?,
            members: HashMap::try_from(Map::HashMap(open_map(pin, map_names::MEMBERS)?))?,
            backend_stats: PerCpuArray::try_from(Map::PerCpuArray(open_map(
                pin,
                map_names::BACKEND_STATS,
            )?))?,
        })
    }
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |e| MapError {
        map,
        op,
        reason: e.to_string(),
    }
}

fn collect<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(err(name, "iterate"))
}

/// Deleting a key that is already gone is not an error.
fn tolerate_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Writes `entries` by batch updates, or entry by entry where the kernel has none.
fn set_many<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), MapError> {
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    match update_batch(fd, entries) {
        Ok(true) => Ok(()),
        Ok(false) => entries
            .iter()
            .try_for_each(|(k, v)| map.insert(k, v, 0).map_err(err(name, "update"))),
        Err(e) => Err(MapError {
            map: name,
            op: "batch update",
            reason: e.to_string(),
        }),
    }
}

impl ServiceMaps for PinnedMaps {
    fn capacity(&self) -> Capacity {
        self.capacity
    }
    fn set_services(&mut self, entries: &[(ServiceKeyV4, ServiceV4)]) -> Result<(), MapError> {
        set_many(&mut self.services, map_names::SERVICES_V4, entries)
    }
    fn set_slots(&mut self, entries: &[(BackendSlotKey, u32)]) -> Result<(), MapError> {
        set_many(&mut self.slots, map_names::BACKEND_SLOTS, entries)
    }
    fn set_backends(&mut self, entries: &[(u32, BackendV4)]) -> Result<(), MapError> {
        set_many(&mut self.backends, map_names::BACKENDS_V4, entries)
    }
    fn set_members(&mut self, entries: &[(MemberKey, u32)]) -> Result<(), MapError> {
        set_many(&mut self.members, map_names::MEMBERS, entries)
    }
    fn services(&self) -> Result<Vec<(ServiceKeyV4, ServiceV4)>, MapError> {
        collect(&self.services, map_names::SERVICES_V4)
    }
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError> {
        collect(&self.slots, map_names::BACKEND_SLOTS)
    }
    fn backends(&self) -> Result<Vec<(u32, BackendV4)>, MapError> {
        collect(&self.backends, map_names::BACKENDS_V4)
    }
    fn set_service(&mut self, key: &ServiceKeyV4, value: &ServiceV4) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(err(map_names::SERVICES_V4, "update"))
    }
    fn delete_service(&mut self, key: &ServiceKeyV4) -> Result<(), MapError> {
        tolerate_missing(self.services.remove(key)).map_err(err(map_names::SERVICES_V4, "delete"))
    }
    fn set_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<(), MapError> {
        self.slots
            .insert(key, backend_id, 0)
            .map_err(err(map_names::BACKEND_SLOTS, "update"))
    }
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapError> {
        tolerate_missing(self.slots.remove(key)).map_err(err(map_names::BACKEND_SLOTS, "delete"))
    }
    fn set_backend(&mut self, id: u32, value: &BackendV4) -> Result<(), MapError> {
        self.backends
            .insert(id, value, 0)
            .map_err(err(map_names::BACKENDS_V4, "update"))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        tolerate_missing(self.backends.remove(&id)).map_err(err(map_names::BACKENDS_V4, "delete"))
    }
    fn members(&self) -> Result<Vec<(MemberKey, u32)>, MapError> {
        collect(&self.members, map_names::MEMBERS)
    }
    fn set_member(&mut self, key: &MemberKey, slot: u32) -> Result<(), MapError> {
        self.members
            .insert(key, slot, 0)
            .map_err(err(map_names::MEMBERS, "update"))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        tolerate_missing(self.members.remove(key)).map_err(err(map_names::MEMBERS, "delete"))
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| MapError {
            map: map_names::BACKEND_STATS,
            op: "reset",
            reason: format!("{what}: {e}"),
        })?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![BackendStats::default(); cpus])
            .map_err(|e| MapError {
                map: map_names::BACKEND_STATS,
                op: "reset",
                reason: e.to_string(),
            })?;
        self.backend_stats
            .set(id, zeros, 0)
            .map_err(err(map_names::BACKEND_STATS, "reset"))
    }
    fn maglev_geometry(&self) -> (u32, u32) {
        (self.maglev.size, self.maglev.tables())
    }
    fn backend_id_watermark(&self) -> Result<u32, MapError> {
        self.config
            .get(&lb_common::config::BACKEND_ID_WATERMARK, 0)
            .map_err(err(map_names::CONFIG, "lookup"))
    }
    fn set_backend_id_watermark(&mut self, id: u32) -> Result<(), MapError> {
        self.config
            .set(lb_common::config::BACKEND_ID_WATERMARK, id, 0)
            .map_err(err(map_names::CONFIG, "update"))
    }
    fn set_maglev_table(&mut self, index: u32, content: &[u32]) -> Result<usize, MapError> {
        self.maglev.write(index, content)
    }
    fn source_ranges(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, MapError> {
        self.ranges
            .iter()
            .map(|r| {
                r.map(|(k, _)| {
                    let d = k.data();
                    (
                        u32::from_be(d.svc_id_be),
                        Ipv4Addr::from(d.addr.to_ne_bytes()),
                        k.prefix_len().saturating_sub(32) as u8,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err(map_names::SOURCE_RANGES_V4, "iterate"))
    }
    fn set_source_range(&mut self, svc_id: u32, net: Ipv4Addr, len: u8) -> Result<(), MapError> {
        self.ranges
            .insert(&range_key(svc_id, net, len), 1, 0)
            .map_err(err(map_names::SOURCE_RANGES_V4, "update"))
    }
    fn delete_source_range(&mut self, svc_id: u32, net: Ipv4Addr, len: u8) -> Result<(), MapError> {
        tolerate_missing(self.ranges.remove(&range_key(svc_id, net, len)))
            .map_err(err(map_names::SOURCE_RANGES_V4, "delete"))
    }
}

/// The `LB4_SRC_RANGES` key of a service's range: the service id is matched whole, then
/// `len` bits of the address.
fn range_key(svc_id: u32, net: Ipv4Addr, len: u8) -> LpmKey<SourceRangeV4> {
    LpmKey::new(
        32 + len as u32,
        SourceRangeV4 {
            svc_id_be: svc_id.to_be(),
            addr: u32::from_ne_bytes(net.octets()),
        },
    )
}

/// Every backend's counters, summed over CPUs: (backend address, counters).
pub fn read_backend_stats(pin: &Path) -> Result<Vec<(String, BackendStats)>> {
    let maps = PinnedMaps::open(pin)?;
    let mut out = Vec::new();
    for (id, b) in maps.backends()? {
        let values = maps.backend_stats.get(&id, 0)?;
        let mut sum = BackendStats::default();
        for v in values.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
        }
        let addr = std::net::Ipv4Addr::from(b.addr.to_ne_bytes());
        let proto = crate::model::Proto::from_number(b.proto)
            .map(|p| p.to_string())
            .unwrap_or_else(|| b.proto.to_string());
        out.push((format!("{addr}:{}/{proto}", u16::from_be(b.port)), sum));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The global datapath counters, summed over CPUs, by name.
pub fn read_stats(pin: &Path) -> Result<Vec<(&'static str, u64)>> {
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open_map(pin, map_names::STATS)?))?;
    let mut out = Vec::new();
    for (i, name) in stat::NAMES.iter().enumerate() {
        let values = map.get(&(i as u32), 0)?;
        out.push((*name, values.iter().sum()));
    }
    Ok(out)
}

/// One service id's counters, summed over CPUs.
pub fn read_service_stats(pin: &Path, ids: &[u32]) -> Result<Vec<(u32, ServiceStats)>> {
    let map: PerCpuArray<MapData, ServiceStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open_map(pin, map_names::SERVICE_STATS)?))?;
    let mut out = Vec::new();
    for &id in ids {
        let values = map.get(&id, 0)?;
        let mut sum = ServiceStats::default();
        for v in values.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
            sum.new_flows += v.new_flows;
            sum.rejected += v.rejected;
        }
        out.push((id, sum));
    }
    Ok(out)
}
