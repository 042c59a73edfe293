//! A home router that forwards ports on request: miniupnpd (UPnP IGD and NAT-PMP) in the
//! router's namespace, writing its port mappings into nftables chains made for it here.
//!
//! UPnP clients and miniupnpd both refuse a gateway whose internet address is in a reserved
//! range (private, shared, benchmarking, documentation), so a UPnP site's access link gets
//! an ordinary-looking address instead (see [`crate::Nat::Upnp`]); it never leaves the lab's
//! own namespaces.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns;
use crate::LabError;

/// miniupnpd, running for one router; stopped and its files removed on drop.
pub(crate) struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts miniupnpd in router namespace `ns`, serving the LAN `lan_net` (like
/// `10.1.0.0/24`) on interface `lan` and mapping ports on `wan`.
pub(crate) fn start(ns: &str, lan: &str, wan: &str, lan_net: &str) -> Result<Daemon, LabError> {
    let nft = |rule: &str| netns::exec(ns, "nft", &[rule]);
    nft("add table inet miniupnpd")?;
    for chain in ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"] {
        nft(&format!("add chain inet miniupnpd {chain}"))?;
    }
    nft("add chain inet miniupnpd prerouting { type nat hook prerouting priority -100 ; }")?;
    nft("add rule inet miniupnpd prerouting jump prerouting_miniupnpd")?;
    nft("add chain inet miniupnpd postrouting { type nat hook postrouting priority 100 ; }")?;
    nft("add rule inet miniupnpd postrouting jump postrouting_miniupnpd")?;
    // The router's iptables FORWARD policy drops what the LAN did not ask for; a mapped
    // port's packets are asked for.
    netns::exec(
        ns,
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-i",
            wan,
            "-o",
            lan,
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-j",
            "ACCEPT",
        ],
    )?;

    let dir = std::env::temp_dir().join(format!("{ns}.miniupnpd"));
    std::fs::create_dir_all(&dir).map_err(|source| LabError::Spawn {
        command: format!("mkdir {}", dir.display()),
        source,
    })?;
    let conf = dir.join("miniupnpd.conf");
    let text = format!(
        "ext_ifname={wan}\n\
         listening_ip={lan}\n\
         http_port=0\n\
         enable_upnp=yes\n\
         enable_natpmp=yes\n\
         secure_mode=yes\n\
         system_uptime=yes\n\
         upnp_table_name=miniupnpd\n\
         upnp_nat_table_name=miniupnpd\n\
         upnp_forward_chain=miniupnpd\n\
         upnp_nat_chain=prerouting_miniupnpd\n\
         upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
         lease_file={leases}\n\
         allow 1024-65535 {lan_net} 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n",
        leases = dir.join("leases").display(),
    );
    std::fs::write(&conf, text).map_err(|source| LabError::Spawn {
        command: format!("write {}", conf.display()),
        source,
    })?;
    let log = dir.join("log");
    let log_file = std::fs::File::create(&log).map_err(|source| LabError::Spawn {
        command: format!("create {}", log.display()),
        source,
    })?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "miniupnpd", "-d", "-f"])
        .arg(&conf)
        .arg("-P")
        .arg(dir.join("pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    let line = format!("{cmd:?}");
    let child = cmd.spawn().map_err(|source| LabError::Spawn {
        command: line.clone(),
        source,
    })?;
    let daemon = Daemon { child, dir };
    // A UPnP client searches once, when its node starts listening: the router must answer
    // from the start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("HTTP listening on port")) {
        if Instant::now() > deadline {
            return Err(LabError::Command {
                command: line,
                status: "not listening after 10 s".into(),
                stderr: std::fs::read_to_string(&log).unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(daemon)
}
