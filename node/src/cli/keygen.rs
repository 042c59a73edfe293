//! `allmende keygen FILE`: a new private-swarm key in the standard
//! `/key/swarm/psk/1.0.0/` file format, readable by other libp2p tools.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use libp2p::pnet::PreSharedKey;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key; an existing file is never overwritten.
    file: PathBuf,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let key = PreSharedKey::new(rand::random());
    let fingerprint = key.fingerprint();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&args.file)
        .with_context(|| format!("cannot create {}", args.file.display()))?;
    file.write_all(key.to_key_file().as_bytes())?;
    println!(
        "wrote swarm key {} (fingerprint {fingerprint})",
        args.file.display()
    );
    println!("give this file to every member of the private swarm, and to no one else");
    Ok(())
}
