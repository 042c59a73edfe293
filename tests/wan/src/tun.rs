//! TUN devices: the two ends of an emulated access link.
//!
//! The kernel has no `netem` here, so each link is a pair of TUN devices whose packets the
//! lab's own threads carry across (see `link.rs`). The ioctl and `poll` need `unsafe`; the
//! rest of the crate stays safe.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, PipeReader};
use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: a name and flags, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TUN device (layer 3, no packet-information header). The device lives as long as
/// the file: closing it removes the interface, whichever namespace it was moved to.
pub(crate) struct Tun {
    pub(crate) file: File,
    pub(crate) name: String,
}

impl Tun {
    /// Creates a TUN device in the calling thread's network namespace with a name the kernel
    /// picks from `pattern` (which contains `%d`), so concurrent labs never collide.
    pub(crate) fn create(pattern: &str) -> io::Result<Tun> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        let bytes = pattern.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: `req` is a properly sized, initialised ifreq that outlives the call, and
        // the fd is an open /dev/net/tun.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Ok(Tun { file, name })
    }
}

/// Blocks until `file` has a packet to read (true) or `stop`'s writer is gone (false).
/// Blocking in `poll` rather than `read` keeps an idle lab at no CPU while still letting
/// it shut its threads down.
pub(crate) fn wait_readable(file: &File, stop: &PipeReader) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("TUN device gone"));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}
