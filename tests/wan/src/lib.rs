//! A small internet on one Linux machine, for testing Allmende across NATs and delays.
//!
//! A lab is a set of network namespaces: an "internet" core, and one site per [`Site`]
//! attached to it by an access link with a one-way delay, optional jitter, random loss and
//! a rate limit per direction. A site is a public host (its address is on the internet) or
//! a home: a host on a LAN behind a NAT router, which is either endpoint-independent
//! ([`Nat::Cone`], hole punching works) or symmetric ([`Nat::Symmetric`], it does not).
//!
//! Packets between two sites cross both sites' access links, so the one-way delay between
//! them is the sum of their `delay`s, and the round trip twice that.
//!
//! Addresses: site number N (1-based, in the order given) has the access link
//! 198.18.N.1 (core side) to 198.18.N.2 (site side), inside the range reserved for
//! benchmarking (11.0.N.1 to 11.0.N.2 for a [`Nat::Upnp`] site); a home's LAN is
//! 10.N.0.0/24, router 10.N.0.1, host 10.N.0.2.
//!
//! Building a lab needs root and happens only inside the sandbox of [`sandboxed`]; dropping
//! it stops its links and removes its namespaces, killing what still runs in them.
//!
//! Delay, jitter, loss and rate limits are applied by the lab's own threads, between two TUN
//! devices per access link, so the lab needs no `netem` in the kernel: only TUN, veth and
//! iptables (with conntrack and MASQUERADE), and miniupnpd for UPnP sites. Its tests run as root: `cargo test -p
//! allmende-wan-lab`, each test inside its own sandbox.

mod link;
mod nat;
mod netns;
mod sandbox;
mod tun;
mod upnp;

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use link::{DirectionCounters, LinkCounters};
pub use sandbox::{in_sandbox, sandboxed, SANDBOX_ENV};

use link::{Link, Shape};

/// How a site is attached to the internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// The host's address is on the internet; anyone can connect to it.
    Public,
    /// Behind an endpoint-independent NAT that keeps source ports (a home router).
    Cone,
    /// Behind a NAT that picks a new random port for every destination (some carrier NATs).
    Symmetric,
    /// Behind a cone NAT whose router forwards ports on request (UPnP IGD and NAT-PMP, by
    /// miniupnpd). Its access link is 11.0.N.0/30 rather than 198.18.N.0/30: UPnP refuses
    /// gateways with reserved addresses.
    Upnp,
}

/// One site of a lab and its access link.
#[derive(Clone, Debug)]
pub struct Site {
    /// Unique in the lab; letters, digits, `-` and `_`.
    pub name: String,
    pub nat: Nat,
    /// One-way delay of this access link, each direction.
    pub delay: Duration,
    /// Extra delay drawn uniformly from 0 to this, per packet; packets are never reordered.
    pub jitter: Duration,
    /// Probability (0 to 1) that a packet is lost, each direction.
    pub loss: f64,
    /// Rate limit from the site to the internet, bits per second.
    pub uplink_bps: Option<u64>,
    /// Rate limit from the internet to the site, bits per second.
    pub downlink_bps: Option<u64>,
}

impl Site {
    /// A site without delay, loss or rate limits; set the fields to shape its link.
    pub fn new(name: impl Into<String>, nat: Nat) -> Site {
        Site {
            name: name.into(),
            nat,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            uplink_bps: None,
            downlink_bps: None,
        }
    }
}

/// Why a lab could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("a lab is built only inside the sandbox (see `sandboxed`), never in the machine's own network")]
    NotSandboxed,
    #[error("invalid site {name:?}: {reason}")]
    InvalidSite { name: String, reason: &'static str },
    #[error("a lab holds at most 250 sites")]
    TooManySites,
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot create a TUN device: {0}")]
    Tun(std::io::Error),
}

struct SiteState {
    name: String,
    /// The namespace of the site's host (the router is another one for a home).
    host_ns: String,
    host_ip: Ipv4Addr,
    wan_ip: Ipv4Addr,
    link: Link,
    /// The router's UPnP daemon, for a [`Nat::Upnp`] site.
    _upnp: Option<upnp::Daemon>,
}

/// A running lab; see the crate documentation.
pub struct Lab {
    sites: Vec<SiteState>,
    /// Every namespace created, in order, so that a half-built lab is removed too.
    namespaces: Vec<String>,
}

impl Lab {
    /// Builds the namespaces, links and NAT routers of `sites`.
    pub fn build(sites: &[Site]) -> Result<Lab, LabError> {
        if !in_sandbox() {
            return Err(LabError::NotSandboxed);
        }
        validate(sites)?;
        static LABS: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "wan{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        // Fills in as it goes, so that `Drop` cleans up after a failure half way.
        let mut lab = Lab {
            sites: Vec::new(),
            namespaces: Vec::new(),
        };
        // `.` never occurs in a site name, so these names cannot collide with a site's.
        let core = format!("{prefix}.internet");
        lab.add_namespace(&core)?;
        netns::sysctl(&core, "net.ipv4.ip_forward=1")?;
        for (i, site) in sites.iter().enumerate() {
            let state = lab.add_site(&prefix, &core, i as u8 + 1, site)?;
            lab.sites.push(state);
        }
        Ok(lab)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<(), LabError> {
        netns::add(ns)?;
        self.namespaces.push(ns.to_owned());
        Ok(())
    }

    fn add_site(
        &mut self,
        prefix: &str,
        core: &str,
        n: u8,
        site: &Site,
    ) -> Result<SiteState, LabError> {
        let host_ns = format!("{prefix}-{}", site.name);
        let edge_ns = match site.nat {
            Nat::Public => host_ns.clone(),
            Nat::Cone | Nat::Symmetric | Nat::Upnp => format!("{prefix}-{}.router", site.name),
        };
        self.add_namespace(&edge_ns)?;
        let net = match site.nat {
            Nat::Upnp => format!("11.0.{n}"),
            _ => format!("198.18.{n}"),
        };
        let (core_addr, site_addr) = (format!("{net}.1"), format!("{net}.2"));

        let core_tun = tun::Tun::create("wlab%d").map_err(LabError::Tun)?;
        let site_tun = tun::Tun::create("wlab%d").map_err(LabError::Tun)?;
        let core_if = format!("site{n}");
        attach(&core_tun.name, core, &core_if, &core_addr)?;
        attach(&site_tun.name, &edge_ns, "wan", &site_addr)?;
        netns::ip(&["-n", &edge_ns, "route", "add", "default", "dev", "wan"])?;

        let mut upnp = None;
        let host_ip = match site.nat {
            Nat::Public => site_addr.parse().expect("valid address"),
            Nat::Cone | Nat::Symmetric | Nat::Upnp => {
                self.add_namespace(&host_ns)?;
                let (router_lan, host_lan) = (format!("10.{n}.0.1"), format!("10.{n}.0.2"));
                netns::ip(&[
                    "-n", &edge_ns, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                    "netns", &host_ns,
                ])?;
                netns::ip(&[
                    "-n",
                    &edge_ns,
                    "addr",
                    "add",
                    &format!("{router_lan}/24"),
                    "dev",
                    "lan",
                ])?;
                netns::ip(&["-n", &edge_ns, "link", "set", "lan", "up"])?;
                netns::ip(&[
                    "-n",
                    &host_ns,
                    "addr",
                    "add",
                    &format!("{host_lan}/24"),
                    "dev",
                    "eth0",
                ])?;
                netns::ip(&["-n", &host_ns, "link", "set", "eth0", "up"])?;
                netns::ip(&[
                    "-n",
                    &host_ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &router_lan,
                ])?;
                nat::configure_router(&edge_ns, "lan", "wan", site.nat == Nat::Symmetric)?;
                if site.nat == Nat::Upnp {
                    let lan_net = format!("10.{n}.0.0/24");
                    upnp = Some(upnp::start(&edge_ns, "lan", "wan", &lan_net)?);
                }
                host_lan.parse().expect("valid address")
            }
        };
        let shape = |rate_bps| Shape {
            delay: site.delay,
            jitter: site.jitter,
            loss: site.loss,
            rate_bps,
        };
        let link = Link::start(
            site_tun,
            core_tun,
            shape(site.uplink_bps),
            shape(site.downlink_bps),
        )
        .map_err(LabError::Tun)?;
        Ok(SiteState {
            name: site.name.clone(),
            host_ns,
            host_ip,
            wan_ip: site_addr.parse().expect("valid address"),
            link,
            _upnp: upnp,
        })
    }

    fn site(&self, name: &str) -> &SiteState {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no site {name:?} in this lab"))
    }

    /// The address of the site's host: its internet address if public, its LAN address if
    /// behind NAT. Panics for an unknown site, as do the other per-site methods.
    pub fn host_ip(&self, site: &str) -> Ipv4Addr {
        self.site(site).host_ip
    }

    /// The site's address on the internet: the NAT router's, or the public host's.
    pub fn wan_ip(&self, site: &str) -> Ipv4Addr {
        self.site(site).wan_ip
    }

    /// The name of the site host's network namespace (for `ip netns exec` and the like).
    pub fn namespace(&self, site: &str) -> &str {
        &self.site(site).host_ns
    }

    /// A command that runs `program` in the site's host namespace. The lab kills what still
    /// runs there when it is dropped.
    pub fn command(&self, site: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.site(site).host_ns])
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread inside the site's host namespace and returns its result. Sockets
    /// created in `f` stay in that namespace wherever they are used afterwards, so a test can
    /// talk between sites from one process.
    pub fn run_in<T: Send>(&self, site: &str, f: impl FnOnce() -> T + Send) -> T {
        let ns = &self.site(site).host_ns;
        std::thread::scope(|s| {
            s.spawn(|| {
                netns::enter(ns).unwrap_or_else(|e| panic!("cannot enter namespace {ns}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Packets and bytes carried by the site's access link, and those dropped.
    pub fn link_counters(&self, site: &str) -> LinkCounters {
        self.site(site).link.counters()
    }

    /// Changes the one-way delay of the site's access link, both directions, at once (packets
    /// already in flight keep theirs).
    pub fn set_delay(&self, site: &str, delay: Duration) {
        self.site(site).link.set_delay(delay);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Links first: their threads and TUN devices go before the namespaces holding them.
        self.sites.clear();
        for ns in self.namespaces.drain(..).rev() {
            netns::remove(&ns);
        }
    }
}

/// Moves TUN device `tun` into `ns` as `name`, on the /30 its link's two ends share.
/// A /30 rather than a point-to-point `peer` address: programs that list interface
/// addresses (libp2p among them) read a point-to-point interface's peer as its own.
fn attach(tun: &str, ns: &str, name: &str, local: &str) -> Result<(), LabError> {
    netns::ip(&["link", "set", "dev", tun, "netns", ns])?;
    netns::ip(&[
        "-n", ns, "link", "set", "dev", tun, "name", name, "mtu", "1500",
    ])?;
    // The lab's internet is IPv4; IPv6 would add router solicitations to the counters.
    netns::sysctl(ns, &format!("net.ipv6.conf.{name}.disable_ipv6=1"))?;
    netns::ip(&["-n", ns, "addr", "add", &format!("{local}/30"), "dev", name])?;
    netns::ip(&["-n", ns, "link", "set", name, "up"])
}

fn validate(sites: &[Site]) -> Result<(), LabError> {
    if sites.len() > 250 {
        return Err(LabError::TooManySites);
    }
    for (i, site) in sites.iter().enumerate() {
        let bad = |reason| {
            Err(LabError::InvalidSite {
                name: site.name.clone(),
                reason,
            })
        };
        if site.name.is_empty() || site.name.len() > 64 {
            return bad("the name must have 1 to 64 characters");
        }
        if !site
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("the name may hold only letters, digits, - and _");
        }
        if sites[..i].iter().any(|s| s.name == site.name) {
            return bad("the name is used twice");
        }
        if !(0.0..=1.0).contains(&site.loss) {
            return bad("loss must be between 0 and 1");
        }
        if site.uplink_bps == Some(0) || site.downlink_bps == Some(0) {
            return bad("a rate limit must be above 0");
        }
    }
    Ok(())
}
