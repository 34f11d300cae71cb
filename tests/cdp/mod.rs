//! A DevTools-protocol client for headless Chromium, over the browser's WebSocket: enough to
//! load a page, read its events and evaluate JavaScript in it. Shared by the audit page's
//! browser test and the benchmark (which includes this file by path).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Chromium: `REFERRAL_REWARDS_TEST_CHROMIUM`, else `chromium` (or `chromium-browser`,
/// `google-chrome`) on PATH.
pub fn find_chromium() -> Option<PathBuf> {
    let given = std::env::var_os("REFERRAL_REWARDS_TEST_CHROMIUM")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    given.or_else(|| {
        ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .find_map(|name| {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join(name))
                        .find(|p| p.is_file())
                })
            })
    })
}

/// The browser, killed when dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools-protocol session on one page target, over the browser's WebSocket.
pub struct Cdp {
    pub ws: tungstenite::WebSocket<TcpStream>,
    pub next: u64,
    pub session: Option<String>,
    /// Every event seen, in order.
    pub events: Vec<Value>,
}

impl Cdp {
    pub fn connect(url: &str) -> Cdp {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let stream = TcpStream::connect(&addr).unwrap();
        // A browser that stops answering fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (ws, _) = tungstenite::client(url, stream).unwrap();
        Cdp {
            ws,
            next: 0,
            session: None,
            events: vec![],
        }
    }

    pub fn read(&mut self) -> Value {
        loop {
            match self.ws.read().expect("the browser answers") {
                tungstenite::Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                _ => continue,
            }
        }
    }

    /// Sends a command and returns its result; events that arrive meanwhile are kept.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let v = self.read();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    /// Waits for an event (or finds it among those already seen).
    pub fn wait_for(&mut self, method: &str) -> Value {
        if let Some(e) = self.events.iter().find(|e| e["method"] == method) {
            return e.clone();
        }
        loop {
            let v = self.read();
            self.events.push(v.clone());
            if v["method"] == method {
                return v;
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }
}

/// Starts headless Chromium and returns it with its DevTools WebSocket URL, read from the log
/// line it prints when it listens (no sleep: the line is the handshake).
pub fn launch(chromium: &Path) -> (Browser, String) {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-port=0",
            "--window-size=1280,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("Chromium printed its DevTools address before exiting")
            .unwrap();
        if let Some(at) = line.find("ws://") {
            break line[at..].trim().to_owned();
        }
    };
    // Keep draining its log so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (
        Browser {
            child,
            _profile: profile,
        },
        url,
    )
}

impl Cdp {
    /// Opens a page target and attaches to it, with its Page, Runtime, Log and Network events on.
    pub fn open_page(&mut self) {
        let target = self.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        for domain in ["Page", "Runtime", "Log", "Network"] {
            self.call(&format!("{domain}.enable"), json!({}));
        }
        self.events.clear();
    }

    /// Navigates and waits for the load event; returns the navigation's load time in ms.
    pub fn load(&mut self, url: &str) -> f64 {
        // Only this navigation's events: an earlier load event must not end the wait.
        self.events.clear();
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for("Page.loadEventFired");
        self.eval(
            "(() => { const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd || performance.now(); })()",
        )
        .as_f64()
        .unwrap()
    }
}
