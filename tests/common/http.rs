//! A small blocking HTTP/1.1 client that reports exactly what the server did: a full response,
//! a clean close, or a reset.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// One connection, reusable for keep-alive.
pub struct Conn<S: Read + Write> {
    reader: BufReader<S>,
}

impl Conn<TcpStream> {
    pub fn tcp(addr: SocketAddr) -> io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }
}

impl Conn<UnixStream> {
    pub fn unix(path: &Path) -> io::Result<Self> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            reader: BufReader::new(s),
        })
    }
}

impl<S: Read + Write> Conn<S> {
    /// Sends a GET (or `method`) with extra header lines and reads the response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> io::Result<Response> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.reader.get_mut().write_all(req.as_bytes())?;
        self.read_response(method == "HEAD")
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.request("GET", path, &[])
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// Reads the status line and headers only.
    pub fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a response",
            ));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {line:?}"),
                )
            })?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside the head",
                ));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        Ok((status, headers))
    }

    pub fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let (status, headers) = self.read_head()?;
        let mut r = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return Ok(r);
        }
        if let Some(len) = r.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
            r.body.resize(len, 0);
            self.reader.read_exact(&mut r.body)?;
        } else if r
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                r.body.extend_from_slice(&chunk[..n]);
            }
        } else {
            self.reader.read_to_end(&mut r.body)?;
        }
        Ok(r)
    }

    /// Reads the body of a response whose head was read with [`Conn::read_head`], `n` bytes.
    pub fn read_body(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut body = vec![0; n];
        self.reader.read_exact(&mut body)?;
        Ok(body)
    }

    /// Waits for the server to end the connection: Ok(()) for a clean close (EOF), the error
    /// (e.g. a reset) otherwise. Bytes received instead are an error too.
    pub fn expect_close(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf)? {
            0 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected bytes instead of a close",
            )),
        }
    }
}

/// Reads and drops what arrives on `stream` until the server ends the connection (a close or a
/// reset); the bytes read by then. An error if it is still open after `within` without a byte.
pub fn read_until_closed(stream: &mut TcpStream, within: Duration) -> io::Result<usize> {
    stream.set_read_timeout(Some(within))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Starts downloading `path` over a fresh keep-alive connection: sends the GET, reads the
/// response head, and returns the connection (positioned at the body) and the body's length.
/// Reading the body slowly, or not at all, keeps the response in flight.
pub fn start_download(addr: SocketAddr, path: &str) -> (Conn<TcpStream>, usize) {
    let mut conn = Conn::tcp(addr).unwrap();
    conn.write_raw(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let (status, headers) = conn.read_head().unwrap();
    assert_eq!(status, 200, "GET {path}");
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .expect("a content-length");
    (conn, len)
}

/// GET over a fresh TCP connection with `Connection: close`; returns once the server has
/// closed the connection too (cleanly: a reset is an error).
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut conn = Conn::tcp(addr)?;
    let response = conn.request("GET", path, &[("Connection", "close")])?;
    conn.expect_close()?;
    Ok(response)
}
