//! The buyers' HTTP/1.1 client: raw hyper connections, one kept per instance and dropped after any failure.
//!
//! Not goose (which measures, and hides why a call failed) and not `client::send` (built on goose users, with a
//! fixed list of base URLs): here every call must say exactly how it ended, because a refused connection, a
//! timeout and a broken answer are indeterminate outcomes the checker must not read as answers, and an instance
//! that restarts on another port must be reached there (`Addrs`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::history::Outcome;

/// Where each instance listens now; a restart may move one.
#[derive(Debug)]
pub struct Addrs(RwLock<Vec<SocketAddr>>);

impl Addrs {
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Self(RwLock::new(addrs))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, instance: usize) -> SocketAddr {
        let addrs = self.read();
        addrs[instance % addrs.len()]
    }

    pub fn set(&self, instance: usize, addr: SocketAddr) {
        let mut addrs = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = addrs.get_mut(instance) {
            *slot = addr;
        }
    }

    pub fn all(&self) -> Vec<SocketAddr> {
        self.read().clone()
    }

    /// The list, even if a writer panicked holding the lock (a plain `Vec` of addresses cannot be left
    /// half-written).
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<SocketAddr>> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One call.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub token: Option<String>,
    pub body: Option<Value>,
    pub idempotency_key: Option<String>,
}

impl Request {
    pub fn new(method: Method, path: String) -> Self {
        Self {
            method,
            path,
            token: None,
            body: None,
            idempotency_key: None,
        }
    }
}

/// How a call ended, and the answer's JSON body (`Null` when none or not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub outcome: Outcome,
    pub body: Value,
}

impl Answer {
    fn error(text: String) -> Self {
        Self {
            outcome: Outcome::Error(text),
            body: Value::Null,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Status(status) => Some(status),
            Outcome::Error(_) => None,
        }
    }
}

/// A buyer's connections: one per instance, to the address it was opened to.
pub struct Client {
    addrs: Arc<Addrs>,
    connections: Vec<Option<(SocketAddr, SendRequest<Full<Bytes>>)>>,
    timeout: Duration,
}

impl Client {
    pub fn new(addrs: Arc<Addrs>, timeout: Duration) -> Self {
        let connections = (0..addrs.len()).map(|_| None).collect();
        Self {
            addrs,
            connections,
            timeout,
        }
    }

    /// Sends `request` to `instance` and reads the whole answer, within the timeout. Any failure drops the
    /// instance's connection, so the next call opens a fresh one.
    pub async fn send(&mut self, instance: usize, request: &Request) -> Answer {
        let instance = instance % self.connections.len().max(1);
        let limit = self.timeout;
        let answer = match tokio::time::timeout(limit, self.exchange(instance, request)).await {
            Ok(Ok(answer)) => return answer,
            Ok(Err(text)) => Answer::error(text),
            Err(_) => Answer::error(format!(
                "error: timeout: no answer within {} ms",
                limit.as_millis()
            )),
        };
        if let Some(slot) = self.connections.get_mut(instance) {
            *slot = None;
        }
        answer
    }

    async fn exchange(&mut self, instance: usize, request: &Request) -> Result<Answer, String> {
        let addr = self.addrs.get(instance);
        let mut reusable = matches!(
            &self.connections[instance],
            Some((at, sender)) if *at == addr && !sender.is_closed()
        );
        if let (true, Some((_, sender))) = (reusable, self.connections[instance].as_mut()) {
            // A kept connection that has closed since its last answer fails here, before anything is sent.
            reusable = sender.ready().await.is_ok();
        }
        if !reusable {
            self.connections[instance] = Some((addr, connect(addr).await?));
        }
        let Some((_, sender)) = self.connections[instance].as_mut() else {
            return Err("error: connect: no connection".to_owned());
        };
        let response = match send_on(sender, addr, request).await {
            // A kept connection the server had already closed: the request was never sent, so sending it on a
            // fresh one is not a retry.
            Err(err) if reusable && err.is_canceled() => {
                let mut fresh = connect(addr).await?;
                let response = send_on(&mut fresh, addr, request).await;
                self.connections[instance] = Some((addr, fresh));
                response
            }
            other => other,
        }
        .map_err(|err| format!("error: send: {err}"))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("error: body: {err}"))?
            .to_bytes();
        Ok(Answer {
            outcome: Outcome::Status(status),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("error: connect: {err}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("error: connect: {err}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send_on(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    request: &Request,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error> {
    sender.ready().await?;
    let body = request
        .body
        .as_ref()
        .map(|b| Bytes::from(b.to_string()))
        .unwrap_or_default();
    let mut builder = hyper::Request::builder()
        .method(request.method.clone())
        .uri(&request.path)
        .header("host", addr.to_string());
    if request.body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    if let Some(token) = &request.token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if let Some(key) = &request.idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    // The parts are a valid method, a path the harness built from ids, and ASCII headers: the builder cannot
    // fail; were it to, the empty request would be answered 404 and recorded as such.
    let built = builder
        .body(Full::new(body))
        .unwrap_or_else(|_| hyper::Request::new(Full::new(Bytes::new())));
    sender.send_request(built).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Answers one request per connection with 201 and a JSON body, then closes.
    async fn one_shot_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let body = r#"{"id":"r1"}"#;
                    let answer = format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_refusals_and_moves_are_told_apart() {
        let up = one_shot_server().await;
        let dead = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let addrs = Arc::new(Addrs::new(vec![up, dead]));
        let mut client = Client::new(Arc::clone(&addrs), Duration::from_secs(5));
        let request = Request::new(Method::GET, "/x".into());
        let answer = client.send(0, &request).await;
        assert_eq!(answer.outcome, Outcome::Status(201));
        assert_eq!(answer.body["id"], "r1");
        // The server closed the connection: the next call opens another one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(client.send(0, &request).await.status(), Some(201));
        let refused = client.send(1, &request).await;
        assert!(
            matches!(&refused.outcome, Outcome::Error(e) if e.starts_with("error: connect:")),
            "{refused:?}"
        );
        addrs.set(1, up);
        assert_eq!(client.send(1, &request).await.status(), Some(201));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut client = Client::new(Arc::new(Addrs::new(vec![addr])), Duration::from_millis(200));
        let answer = client.send(0, &Request::new(Method::GET, "/".into())).await;
        assert_eq!(
            answer.outcome,
            Outcome::Error("error: timeout: no answer within 200 ms".into())
        );
    }
}
