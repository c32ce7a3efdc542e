//! Every raw system call and memory mapping the agent makes, each behind a safe function:
//! this is the only module with `unsafe` code in user space.
//!
//! Why not aya: aya 0.14 (the newest release these machines' compilers build) has no batch
//! operations on hash maps (`BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH`, aya-rs/aya#1124) and no
//! memory mapping of an `BPF_F_MMAPABLE` array, and nix has neither `SO_NETNS_COOKIE` nor
//! `ETHTOOL_GDRVINFO`. Each call here says what it needs in a `SAFETY` comment.
#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    ptr::NonNull,
};

/// A shared, read-write mapping of part of a map's values (an `BPF_F_MMAPABLE` array),
/// unmapped when dropped.
pub struct SharedMapping {
    base: NonNull<libc::c_void>,
    len: usize,
}

impl SharedMapping {
    /// Maps `len` bytes of the map behind `fd` from byte `offset` (a multiple of the page
    /// size).
    pub fn new(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no address hint), of a map the
        // caller holds the descriptor of; the kernel checks that offset and length lie
        // within the map. It is unmapped exactly once, in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMapping { base, len })
    }

    /// A pointer to the aligned `u32` at byte `at`, if it lies within the mapping.
    fn u32_ptr(&self, at: usize) -> Option<*mut u32> {
        (at.is_multiple_of(4) && at.checked_add(4)? <= self.len)
            // SAFETY: `at + 4 <= len`: within the mapping. The mapping is page-aligned and
            // `at` a multiple of 4, so the pointer is aligned for a u32.
            .then(|| {
                #[allow(clippy::cast_ptr_alignment, reason = "aligned: see above")]
                unsafe {
                    self.base.as_ptr().cast::<u8>().add(at).cast::<u32>()
                }
            })
    }

    /// The `u32` at byte `at` (None: outside the mapping or unaligned). A volatile read: the
    /// datapath may write the same memory.
    pub fn read_u32(&self, at: usize) -> Option<u32> {
        let p = self.u32_ptr(at)?;
        // SAFETY: in bounds and aligned (u32_ptr); any bit pattern is a valid u32.
        Some(unsafe { std::ptr::read_volatile(p) })
    }

    /// Writes the `u32` at byte `at`; false when outside the mapping or unaligned. An aligned
    /// 4-byte store, so a concurrent reader sees the old or the new value, never a mix.
    pub fn write_u32(&mut self, at: usize, value: u32) -> bool {
        let Some(p) = self.u32_ptr(at) else {
            return false;
        };
        // SAFETY: in bounds and aligned (u32_ptr); the mapping is writable.
        unsafe { std::ptr::write_volatile(p, value) };
        true
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no reference into it outlives
        // `self`.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

/// A netlink socket subscribed to link and address changes of the calling thread's network
/// namespace (`RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR`): `wait` returns when there is news. The
/// messages are not read for their content: any of them means "look at the interfaces
/// again", which the agent does from the kernel's own list.
pub struct LinkEvents {
    fd: OwnedFd,
}

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        const RTMGRP_LINK: u32 = 1;
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        let fd = netlink_socket(libc::NETLINK_ROUTE, RTMGRP_LINK | RTMGRP_IPV4_IFADDR)?;
        Ok(LinkEvents { fd })
    }

    /// Blocks until the kernel reports a change (reads and drops what it sent). A full
    /// socket buffer (`ENOBUFS`: changes were lost) is news too.
    pub fn wait(&self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: a valid socket and a buffer of the size given, alive for the call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
}

/// A netlink socket of `protocol` in the calling thread's network namespace, bound to the
/// multicast `groups` (0: none, for requests).
pub fn netlink_socket(protocol: libc::c_int, groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain socket(2); the descriptor is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = groups;
    // SAFETY: a valid socket and address of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends one netlink message (to the kernel).
pub fn netlink_send(fd: BorrowedFd<'_>, msg: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: a valid socket and a buffer of the size given, alive for the call.
        let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Receives what the kernel sent next into `buf`: the bytes received.
pub fn netlink_recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: a valid socket and a buffer of the size given, alive for the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, kernel 5.14).
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `ETHTOOL_GDRVINFO` on interface `ifname` of the calling thread's namespace: (driver name,
/// bus info).
pub fn ethtool_driver(ifname: &str) -> io::Result<(String, String)> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    /// `struct ifreq` with `ifr_data`.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ifname:?} is not an interface name"),
        ));
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut info,
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: a valid socket, and an ifreq whose data points at a drvinfo that outlives the
    // call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok((text(&info.driver), text(&info.bus_info)))
}

// Batch operations on hash maps (kernel 5.6): many entries per syscall.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP: the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// One `bpf(cmd, attr)` call; the kernel writes `attr.count` back.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch`; the callers point its key, value and
    // token pointers at buffers of `count` entries of the map's own sizes, alive for the
    // call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<BatchAttr>(attr),
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP))
}

/// Every entry of the hash map behind `fd`, read by `BPF_MAP_LOOKUP_BATCH`; `None` when the
/// kernel has no batch lookups for it (the caller iterates instead). Entries that change
/// during the read may be seen in either state.
pub fn dump_batch<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<(K, V)>>> {
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
            map_fd: fd.as_raw_fd() as u32,
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
pub fn delete_batch<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<bool> {
    let mut done = 0;
    while done < keys.len() {
        let rest = &keys[done..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
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
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> io::Result<bool> {
    const BATCH: usize = 16_384;
    for (n, chunk) in entries.chunks(BATCH).enumerate() {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        if let Err(e) = batch_call(BPF_MAP_UPDATE_BATCH, &mut attr) {
            if n == 0 && attr.count == 0 && unsupported(&e) {
                return Ok(false);
            }
            return Err(io::Error::new(
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
