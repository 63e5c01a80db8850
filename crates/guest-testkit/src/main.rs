//! `hf-guest-testkit`: servers the network tests and benchmarks run inside a
//! guest, where the image has only busybox. Built static like the agent
//! (scripts/build-agent.sh) and uploaded through the files API.
//!
//! - `ws-echo PORT`: a WebSocket server that echoes every text and binary
//!   message, so a test can prove upgrades work through the proxy.

use std::net::TcpListener;
use std::process::ExitCode;

use tungstenite::Message;

fn ws_echo(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    eprintln!("ws-echo: listening on port {port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let Ok(mut ws) = tungstenite::accept(stream) else {
                return;
            };
            while let Ok(msg) = ws.read() {
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, port] if cmd == "ws-echo" => match port.parse::<u16>() {
            Ok(p) => match ws_echo(p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ws-echo: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(_) => {
                eprintln!("ws-echo: '{port}' is not a port number");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("usage: hf-guest-testkit ws-echo PORT");
            ExitCode::from(2)
        }
    }
}
