//! A render in a child process: the `allmende` binary run as `allmende
//! render-template`, under an address-space limit and a CPU-time limit, reading one
//! [`RenderRequest`] on its standard input and writing one reply on its standard
//! output. A template that builds a string past the limit fails the child's
//! allocation, which aborts the child alone; this process reports it as
//! [`ChatTemplateError::OutOfMemory`] and goes on.

// Limits are set between fork and exec, which only an unsafe hook can do.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use serde::{Deserialize, Serialize};

use super::{engine, ChatMessage, ChatTemplateError, RenderRequest};

/// The subcommand of the `allmende` binary that renders one request.
pub const SUBCOMMAND: &str = "render-template";

/// Address space of a render's process apart from what its input adds: the binary's
/// own mappings and the render's working memory, far above what the real templates
/// use (a few kilobytes beyond their output), far below what a machine has.
const MEMORY_BASE: u64 = 512 << 20;
/// And per byte of input: the template engine holds the messages, their values in
/// the template's scope, copies made by filters, and an output up to twice the
/// contents ([`engine::output_limit`]).
const MEMORY_PER_INPUT_BYTE: u64 = 16;
/// CPU time of a render's process: the instruction budget ends a looping template in
/// milliseconds; this ends one that spends its few instructions on enormous copies.
const CPU_SECONDS: u64 = 20;
/// What of the child's error output goes into an error message.
const STDERR_SHOWN: usize = 300;

/// What the child answers.
#[derive(Serialize, Deserialize)]
enum Reply {
    Rendered(String),
    OutOfFuel(u64),
    TooLong(usize),
    Failed(String),
}

/// One render's inputs as the child reads them.
#[derive(Deserialize)]
struct OwnedRequest {
    template: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
}

/// Renders `request` in a child process of `program`.
pub fn render(program: &Path, request: &RenderRequest) -> Result<String, ChatTemplateError> {
    let input = serde_json::to_vec(request)
        .map_err(|e| ChatTemplateError::Process(format!("could not encode the request: {e}")))?;
    let memory =
        MEMORY_BASE.saturating_add(MEMORY_PER_INPUT_BYTE.saturating_mul(input.len() as u64));
    let mut command = Command::new(program);
    command
        .arg(SUBCOMMAND)
        .env_remove("ALLMENDE_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls setrlimit, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            limit(libc::RLIMIT_AS, memory)?;
            limit(libc::RLIMIT_CPU, CPU_SECONDS)?;
            limit(libc::RLIMIT_CORE, 0)
        });
    }
    let mut child = command.spawn().map_err(|e| {
        ChatTemplateError::Process(format!("could not start {}: {e}", program.display()))
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // The child reads all of its input before it writes anything, so this cannot
        // wait on a full output pipe; a child that died early shows in its status.
        let _ = stdin.write_all(&input);
    }
    let output = child
        .wait_with_output()
        .map_err(|e| ChatTemplateError::Process(format!("lost the render process: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failed(output.status, &stderr, memory));
    }
    match serde_json::from_slice(&output.stdout) {
        Ok(Reply::Rendered(text)) => Ok(text),
        Ok(Reply::OutOfFuel(fuel)) => Err(ChatTemplateError::OutOfFuel(fuel)),
        Ok(Reply::TooLong(limit)) => Err(ChatTemplateError::TooLong(limit)),
        Ok(Reply::Failed(message)) => Err(ChatTemplateError::Render(message)),
        Err(e) => Err(ChatTemplateError::Process(format!(
            "its answer could not be read: {e}"
        ))),
    }
}

/// The error for a child that did not answer.
fn failed(status: std::process::ExitStatus, stderr: &str, memory: u64) -> ChatTemplateError {
    if stderr.contains("memory allocation of") {
        return ChatTemplateError::OutOfMemory(memory >> 20);
    }
    if status.signal() == Some(libc::SIGXCPU) {
        return ChatTemplateError::Process(format!(
            "it used more than {CPU_SECONDS} s of CPU time"
        ));
    }
    let shown: String = stderr.trim().chars().take(STDERR_SHOWN).collect();
    ChatTemplateError::Process(format!("it ended with {status}: {shown}"))
}

fn limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The child's side: reads one request from standard input, renders it in this
/// process, and writes the reply to standard output.
pub fn serve_one_render() -> ExitCode {
    let mut input = Vec::new();
    if io::stdin().read_to_end(&mut input).is_err() {
        return ExitCode::FAILURE;
    }
    let reply = match serde_json::from_slice::<OwnedRequest>(&input) {
        Ok(request) => reply(&request),
        Err(e) => Reply::Failed(format!("the request could not be read: {e}")),
    };
    drop(input);
    let written = serde_json::to_writer(io::stdout().lock(), &reply);
    if written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn reply(request: &OwnedRequest) -> Reply {
    let rendered = engine::render_here(&RenderRequest {
        template: &request.template,
        messages: &request.messages,
        add_generation_prompt: request.add_generation_prompt,
        bos_token: &request.bos_token,
        eos_token: &request.eos_token,
    });
    match rendered {
        Ok(text) => Reply::Rendered(text),
        Err(ChatTemplateError::OutOfFuel(fuel)) => Reply::OutOfFuel(fuel),
        Err(ChatTemplateError::TooLong(limit)) => Reply::TooLong(limit),
        Err(ChatTemplateError::Render(message)) => Reply::Failed(message),
        Err(e) => Reply::Failed(e.to_string()),
    }
}
