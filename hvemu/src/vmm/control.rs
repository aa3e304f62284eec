//! The control socket (the VMM's "Hyper-V Manager") and its client.
//!
//! Protocol: a client connects to the Unix stream socket, writes one request line (the
//! `ctl` words, e.g. `nic add --queues 4`, see [`Request::to_line`]) and reads the answer
//! until the server closes: `ok` and the result lines, or one `error: ...` line.
//!
//! Every connection gets its own thread, which parses the line, hands the request to the
//! event loop through a channel, kicks the vCPU thread out of `KVM_RUN`, and waits for
//! the loop's answer. So any number of requests may be in flight at once (several
//! `nic add` together), and the loop handles them between two `KVM_RUN`s without ever
//! blocking on a client.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use super::cli::{parse_request, CtlOptions, Request};
use super::kick::Kicker;

/// How long a connection may take to send its line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for the event loop.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The event loop's answer.
pub type Answer = Result<String, String>;

/// A request waiting for the event loop.
#[derive(Debug)]
pub struct Pending {
    /// What was asked.
    pub request: Request,
    /// Where the answer goes.
    pub reply: Sender<Answer>,
}

/// A running control server; removes its socket file when dropped.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    requests: Receiver<Pending>,
}

impl Server {
    /// Binds `path` (replacing a stale socket, refusing a live one) and starts accepting.
    pub fn start(path: &Path, kicker: Kicker) -> io::Result<Server> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running VMM", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("hvemu-control".into())
            .spawn(move || accept_loop(listener, tx, kicker))?;
        Ok(Server {
            path: path.to_path_buf(),
            requests: rx,
        })
    }

    /// The next request waiting, if any (never blocks).
    pub fn try_next(&self) -> Option<Pending> {
        self.requests.try_recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, tx: Sender<Pending>, kicker: Kicker) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("hvemu-control-conn".into())
            .spawn(move || serve_one(stream, &tx, kicker));
        if let Err(e) = spawned {
            log::warn!("control: cannot start a connection thread: {e}");
        }
    }
}

fn serve_one(stream: UnixStream, tx: &Sender<Pending>, kicker: Kicker) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    let answer = match reader.read_line(&mut line) {
        Ok(_) => {
            let words: Vec<&str> = line.split_whitespace().collect();
            match parse_request(&words) {
                Ok(request) => ask(request, tx, kicker),
                Err(e) => Err(e.0),
            }
        }
        Err(e) => Err(format!("reading the request: {e}")),
    };
    let text = match answer {
        Ok(body) if body.is_empty() => "ok\n".to_string(),
        Ok(body) => format!("ok\n{}\n", body.trim_end()),
        Err(e) => format!("error: {e}\n"),
    };
    let mut stream = stream;
    let _ = stream.write_all(text.as_bytes());
}

fn ask(request: Request, tx: &Sender<Pending>, kicker: Kicker) -> Answer {
    let (reply, answer) = mpsc::channel();
    tx.send(Pending { request, reply })
        .map_err(|_| "the VM is shutting down".to_string())?;
    kicker.kick();
    match answer.recv_timeout(ANSWER_TIMEOUT) {
        Ok(a) => a,
        Err(mpsc::RecvTimeoutError::Timeout) => Err("the VM did not answer in time".into()),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("the VM stopped before answering".into()),
    }
}

/// Sends `request` to the server at `path`; returns the answer.
pub fn request(path: &Path, request: &Request) -> io::Result<Answer> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(format!("{}\n", request.to_line()).as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(match text.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim_start_matches('\n').to_string()),
        None => Err(text
            .trim_end()
            .strip_prefix("error: ")
            .unwrap_or(text.trim_end())
            .to_string()),
    })
}

/// `hvemu-vmm ctl`: prints the answer; status 0 on success, 1 if the VM refused, 2 if
/// the socket could not be reached.
pub fn client(opts: &CtlOptions) -> ExitCode {
    match request(&opts.control, &opts.request) {
        Ok(Ok(body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("hvemu-vmm: error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!(
                "hvemu-vmm: cannot reach the control socket {}: {e}",
                opts.control.display()
            );
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::cli::NicSpec;

    /// A server whose "event loop" is this test: several clients at once, each answered.
    #[test]
    fn concurrent_requests_are_queued_and_answered() {
        let dir = std::env::temp_dir().join(format!("hvemu-ctl-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        // A kicker for a thread that ignores kicks: signal 0 targets nothing here.
        let kicker = Kicker::for_tests();
        let server = Server::start(&path, kicker).unwrap();
        // A second server on the same live path is refused.
        assert!(Server::start(&path, kicker).is_err());

        let clients: Vec<_> = (0..4)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let req = Request::NicAdd(NicSpec {
                        queues: i + 1,
                        ..NicSpec::default()
                    });
                    request(&path, &req).unwrap()
                })
            })
            .collect();
        let mut served = 0;
        while served < 4 {
            match server.try_next() {
                Some(p) => {
                    let Request::NicAdd(spec) = &p.request else {
                        panic!("{:?}", p.request)
                    };
                    let answer = if spec.queues == 3 {
                        Err("no room".to_string())
                    } else {
                        Ok(format!("nic {}", spec.queues))
                    };
                    p.reply.send(answer).unwrap();
                    served += 1;
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let mut answers: Vec<Answer> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        answers.sort();
        assert_eq!(
            answers,
            [
                Ok("nic 1\n".to_string()),
                Ok("nic 2\n".to_string()),
                Ok("nic 4\n".to_string()),
                Err("no room".to_string()),
            ]
        );
        // A malformed line is answered by the connection thread itself.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"reboot\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("error: unknown request 'reboot'"),
            "{text}"
        );
        drop(server);
        assert!(!path.exists(), "socket removed");
        let _ = std::fs::remove_dir(&dir);
    }
}
