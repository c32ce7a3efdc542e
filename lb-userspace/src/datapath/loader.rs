//! Loading the embedded BPF object with its maps and programs pinned under the pin path
//! (`pins`), taking over what a previous agent pinned, and attaching the programs to
//! interfaces and the cgroup with pinned links, so that the datapath outlives the agent.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use super::error::{refuse, Context, Error, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, LinkOrder,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    EbpfLoader,
};
use aya_obj::programs::XdpAttachType;
use lb_common::{map_names, program_names, Clock};

use super::{
    clock,
    pins::{self, link_path, open_map, program_pin, program_pin_new, replace_pin, LinkKind},
};

/// The BPF object, built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

const CGROUP2_MAGIC: i64 = 0x6367_7270;

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

/// The datapath as this agent loaded (or took over) and attached it: the programs, the
/// interfaces it is attached to, and the clock it calibrated.
pub struct Datapath {
    pin: PathBuf,
    xdp: Xdp,
    /// Answers what `lb_xdp` passes on for a frontend without endpoints.
    reject: SchedClassifier,
    /// The translation for pod interfaces (TC, where the skb's checksum state is known).
    tc_pod: SchedClassifier,
    /// The translation for external interfaces in TC.
    tc_ext: SchedClassifier,
    /// Reverse NAT where packets leave (TC egress of pod and external interfaces).
    tc_egress: SchedClassifier,
    /// How external interfaces are attached.
    ext_attach: ExtAttach,
    /// The object, which holds the cgroup socket hooks (attached only by `attach_cgroup`).
    ebpf: aya::Ebpf,
    /// `LB_IFACES`: which interfaces lead to this node's pods.
    ifaces: HashMap<MapData, u32, u32>,
    /// Interfaces whose `LB_IFACES` entry this agent has written.
    marked: HashSet<u32>,
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
    /// calibrated here (about 200 ms).
    pub fn load(pin: &Path, sizes: MapSizes) -> Result<Self> {
        pins::ensure_bpffs(pin)?;
        fs::create_dir_all(pin.join(pins::LINKS_DIR))
            .with_context(|| format!("creating {}", pin.display()))?;
        pins::check_layout(pin)?;
        pins::rename_legacy(pin)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin)
            .map_max_entries(map_names::LB4_SERVICES, sizes.services)
            .map_max_entries(map_names::LB_SVC_STATS, sizes.services)
            .map_max_entries(map_names::LB4_BACKENDS, sizes.backends)
            .map_max_entries(map_names::LB_BE_STATS, sizes.backends)
            .map_max_entries(map_names::LB_SLOTS, sizes.slots)
            .map_max_entries(map_names::LB_MEMBERS, sizes.slots)
            .map_max_entries(map_names::LB4_CONNTRACK, sizes.conntrack)
            .map_max_entries(map_names::LB4_SNAT, sizes.snat)
            .map_max_entries(map_names::LB_MAGLEV, sizes.maglev)
            .map_max_entries(map_names::LB6_SERVICES, sizes.services)
            .map_max_entries(map_names::LB6_BACKENDS, sizes.backends)
            .map_max_entries(map_names::LB6_CONNTRACK, sizes.conntrack)
            .map_max_entries(map_names::LB6_SNAT, sizes.snat)
            .load(EBPF_OBJECT)
            .context("loading the BPF object")?;
        for name in program_names::SOCK {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        {
            let name = program_names::LB_SOCK_DROP;
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        let attached = [
            program_names::LB_XDP,
            program_names::LB_TC_REJECT,
            program_names::LB_TC_POD,
            program_names::LB_TC_EXT,
            program_names::LB_TC_EGRESS,
        ];
        let taken_over = attached[..2].iter().any(|p| program_pin(pin, p).exists());
        // This agent's programs, pinned beside any older ones, then opened from there.
        let [xdp_new, reject_new, pod_new, ext_new, egress_new] =
            attached.map(|p| program_pin_new(pin, p));
        {
            let xdp: &mut Xdp = ebpf
                .program_mut(program_names::LB_XDP)
                .context("program lb_xdp missing from the object")?
                .try_into()?;
            xdp.load().context("loading lb_xdp (verifier)")?;
            replace_pin(&xdp_new, |p| xdp.pin(p))?;
        }
        let xdp = Xdp::from_pin(&xdp_new, XdpAttachType::Interface)
            .with_context(|| format!("opening {}", xdp_new.display()))?;
        let reject = load_classifier(&mut ebpf, program_names::LB_TC_REJECT, &reject_new)?;
        let tc_pod = load_classifier(&mut ebpf, program_names::LB_TC_POD, &pod_new)?;
        let tc_ext = load_classifier(&mut ebpf, program_names::LB_TC_EXT, &ext_new)?;
        let tc_egress = load_classifier(&mut ebpf, program_names::LB_TC_EGRESS, &egress_new)?;
        let ifaces = HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB_IFACES)?))?;
        let clock_prog: &mut Xdp = ebpf
            .program_mut(program_names::LB_CLOCK)
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
        clock::write(pin, &clock)?;
        let mut dp = Datapath {
            pin: pin.to_owned(),
            xdp,
            reject,
            tc_pod,
            tc_ext,
            tc_egress,
            ext_attach: ExtAttach::default(),
            ebpf,
            ifaces,
            marked: HashSet::new(),
            taken_over,
            clock,
        };
        dp.adopt_links()?;
        // The new programs take the usual names (the links hold them either way).
        let new = [xdp_new, reject_new, pod_new, ext_new, egress_new];
        for (from, program) in new.iter().zip(attached) {
            let to = program_pin(pin, program);
            fs::rename(from, &to)
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
        for entry in fs::read_dir(self.pin.join(pins::LINKS_DIR))? {
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
            let prog = match LinkKind::parse(&name) {
                // Replaced in attach_cgroup (or removed, when no --cgroup is given).
                Some((LinkKind::Sock, _)) => continue,
                None => {
                    tracing::warn!(link = %name, "not a link this agent pins; left alone");
                    continue;
                }
                Some((LinkKind::Xdp, _)) => None,
                Some((LinkKind::Reject, _)) => Some(&mut self.reject),
                Some((LinkKind::TcExt, _)) => Some(&mut self.tc_ext),
                Some((LinkKind::TcPod, _)) => Some(&mut self.tc_pod),
                Some((LinkKind::Egress, _)) => Some(&mut self.tc_egress),
            };
            // Each moved link is taken back from its program and closed: only the pin holds
            // it then, so that unpinning it detaches it (see `attach`).
            let moved: Result<()> = if let Some(prog) = prog {
                SchedClassifierLink::try_from(fd)
                    .map_err(Error::from)
                    .and_then(|l| {
                        let id = prog.attach_to_link(l)?;
                        drop(prog.take_link(id)?);
                        Ok(())
                    })
            } else {
                XdpLink::try_from(fd).map_err(Error::from).and_then(|l| {
                    let id = self.xdp.attach_to_link(l)?;
                    drop(self.xdp.take_link(id)?);
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

    fn link_path(&self, kind: LinkKind, ifindex: u32) -> PathBuf {
        link_path(&self.pin, kind, ifindex)
    }

    /// Whether the interface's programs are attached and its kind is recorded.
    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.marked.contains(&ifindex)
            && self.link_path(LinkKind::Egress, ifindex).exists()
            && (self.link_path(LinkKind::TcPod, ifindex).exists()
                || self.link_path(LinkKind::TcExt, ifindex).exists()
                || (self.link_path(LinkKind::Xdp, ifindex).exists()
                    && self.link_path(LinkKind::Reject, ifindex).exists()))
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
            .program(program_names::LB_CLOCK)
            .context("program lb_clock missing from the object")?
            .try_into()?;
        let current = clock::read(&self.pin)?;
        let now = clock::sample(prog)?;
        if current.ns_per_tick != 0
            && clock::drift(&current, now).unsigned_abs() <= 2 * current.ns_per_tick
        {
            return Ok(None);
        }
        let fresh = clock::calibrate(prog)?;
        clock::write(&self.pin, &fresh)?;
        self.clock = fresh;
        Ok(Some(fresh))
    }

    /// Writes one `LB_CONFIG` value.
    pub fn set_config(&mut self, index: u32, value: u32) -> Result<()> {
        let mut config: aya::maps::Array<MapData, u32> =
            aya::maps::Array::try_from(Map::Array(open_map(&self.pin, map_names::LB_CONFIG)?))?;
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
    /// is pinned already: `lb_tc_egress` (TC egress: replies leave translated whichever link
    /// they came in by) first, then on a pod interface `lb_tc_pod` (TC ingress); on an
    /// external one, as `ExtAttach` says, `lb_xdp` with `lb_tc_reject` (TC ingress first, so
    /// that what XDP hands on is answered) or `lb_tc_ext` alone. Links of the other kind on
    /// the interface (left by an agent with another `--ext-attach`) are unpinned, which
    /// detaches them, once the new ones are in. Returns what it attached now, if anything.
    pub fn attach(&mut self, ifindex: u32, ifname: &str, pod: bool) -> Result<Option<Attached>> {
        // The kind first: a packet from a pod must never be taken for an outside one.
        if !self.marked.contains(&ifindex) {
            self.mark(ifindex, pod)?;
        }
        // Egress before ingress: no flow can start here before its replies are translated.
        let egress_path = self.link_path(LinkKind::Egress, ifindex);
        let egress = attach_tcx(
            &mut self.tc_egress,
            ifname,
            &egress_path,
            TcAttachType::Egress,
        )?;
        if pod {
            let path = self.link_path(LinkKind::TcPod, ifindex);
            let now = attach_tcx(&mut self.tc_pod, ifname, &path, TcAttachType::Ingress)?;
            return Ok((now || egress).then_some(Attached::Pod));
        }
        let (xdp_path, reject_path, ext_path) = (
            self.link_path(LinkKind::Xdp, ifindex),
            self.link_path(LinkKind::Reject, ifindex),
            self.link_path(LinkKind::TcExt, ifindex),
        );
        let (kind, now) = match self.ext_attach {
            ExtAttach::Tc => (
                Attached::Tc,
                attach_tcx(&mut self.tc_ext, ifname, &ext_path, TcAttachType::Ingress)?,
            ),
            ExtAttach::Xdp => (
                Attached::Xdp,
                self.attach_xdp(ifindex, ifname, XdpMode::Default)?,
            ),
            ExtAttach::Auto => match super::node::driver(ifname) {
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
                                attach_tcx(
                                    &mut self.tc_ext,
                                    ifname,
                                    &ext_path,
                                    TcAttachType::Ingress,
                                )?,
                            )
                        }
                    }
                }
                // A software device (or one that does not say): TC.
                _ => (
                    Attached::Tc,
                    attach_tcx(&mut self.tc_ext, ifname, &ext_path, TcAttachType::Ingress)?,
                ),
            },
        };
        // The hooks of the other kind go, now that this kind is in place.
        let stale = match kind {
            Attached::Tc => vec![xdp_path, reject_path],
            _ => vec![ext_path],
        };
        for path in stale.iter().filter(|p| p.exists()) {
            fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
            tracing::info!(iface = %ifname, link = %path.display(), "detached (another kind of hook replaces it)");
        }
        Ok((now || egress).then_some(kind))
    }

    /// Attaches `lb_tc_reject` (TC ingress) and then `lb_xdp` where their links are not pinned
    /// yet; whether it attached anything.
    fn attach_xdp(&mut self, ifindex: u32, ifname: &str, mode: XdpMode) -> Result<bool> {
        let reject_path = self.link_path(LinkKind::Reject, ifindex);
        let mut attached = attach_tcx(
            &mut self.reject,
            ifname,
            &reject_path,
            TcAttachType::Ingress,
        )?;
        let xdp_path = self.link_path(LinkKind::Xdp, ifindex);
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
        let old: Vec<PathBuf> = fs::read_dir(self.pin.join(pins::LINKS_DIR))?
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    LinkKind::parse(&n.to_string_lossy())
                        .is_some_and(|(kind, _)| kind == LinkKind::Sock)
                })
            })
            .collect();
        let mut new = Vec::new();
        if let Some(dir) = cgroup {
            let fd = fs::File::open(dir)
                .with_context(|| format!("opening the cgroup {}", dir.display()))?;
            let st = nix::sys::statfs::fstatfs(&fd)
                .with_context(|| format!("statfs {}", dir.display()))?;
            if st.filesystem_type().0 as i64 != CGROUP2_MAGIC {
                refuse!(
                    "--cgroup {}: not a cgroup v2 directory (find the cgroup2 mount in /proc/mounts)",
                    dir.display()
                );
            }
            // The drop first, so that no socket the hooks fence off sends unchecked.
            {
                let name = program_names::LB_SOCK_DROP;
                let prog: &mut CgroupSkb = self
                    .ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing"))?
                    .try_into()?;
                let id = prog
                    .attach(&fd, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", dir.display()))?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                new.push(pin_sock_link(&self.pin, name, link)?);
            }
            for name in program_names::SOCK {
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
                new.push(pin_sock_link(&self.pin, name, link)?);
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
        for entry in fs::read_dir(self.pin.join(pins::LINKS_DIR))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((_, Some(idx))) = LinkKind::parse(&name) else {
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

    /// The reject program (for BPF_PROG_TEST_RUN).
    pub fn reject(&self) -> &SchedClassifier {
        &self.reject
    }

    /// The pod interfaces' program (for BPF_PROG_TEST_RUN).
    pub fn tc_pod(&self) -> &SchedClassifier {
        &self.tc_pod
    }

    /// The external interfaces' TC program (for BPF_PROG_TEST_RUN).
    pub fn tc_ext(&self) -> &SchedClassifier {
        &self.tc_ext
    }

    /// The egress program (for BPF_PROG_TEST_RUN).
    pub fn tc_egress(&self) -> &SchedClassifier {
        &self.tc_egress
    }
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

/// Attaches `prog` to TC ingress or egress (tcx) of `ifname` with a link pinned at `path`,
/// unless one is pinned there already; whether it attached it now.
fn attach_tcx(
    prog: &mut SchedClassifier,
    ifname: &str,
    path: &Path,
    hook: TcAttachType,
) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let id = prog
        .attach_with_options(
            ifname,
            hook,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching TC {hook:?} (tcx) to {ifname}"))?;
    let fd: FdLink = prog.take_link(id)?.try_into()?;
    fd.pin(path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(true)
}

/// Pins a cgroup link of this agent's (replacing a pin of the same name).
fn pin_sock_link(pin: &Path, program: &str, link: FdLink) -> Result<PathBuf> {
    let path = pins::sock_link_path(pin, program);
    let _ = fs::remove_file(&path);
    link.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(path)
}
