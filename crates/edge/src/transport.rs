//! How connections are made: TCP in production; an in-memory pipe when both ends live in
//! one process (the fleet simulator, tests on tokio's paused clock), where no socket
//! exists and no time passes unless a task sleeps. Servers accept from a [`Listener`],
//! clients dial a [`Connector`]; both hand out a [`Stream`].

use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Mutex, mpsc},
};

/// Bytes buffered in each direction of an in-memory connection: enough for a request's
/// headers and a few streamed events, small enough that a slow reader pushes back.
const PIPE_BUFFER: usize = 64 * 1024;

/// One connection, either kind. An enum rather than a boxed trait object: the request
/// path reads and writes through it, and a `match` costs less than a virtual call.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Memory(DuplexStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Memory(s) => s.is_write_vectored(),
        }
    }
}

/// The address of an in-memory server: dialing it hands the server one end of a new pipe.
#[derive(Clone)]
pub struct MemoryAddr {
    name: Arc<str>,
    /// Shared by every clone, so that [`MemoryAddr::rebind`] moves them all at once.
    tx: Arc<std::sync::Mutex<mpsc::UnboundedSender<DuplexStream>>>,
}

impl MemoryAddr {
    /// A new listener at this address, as a restarted server binds its port again: the
    /// old listener receives nothing more, and while the new one is dropped (the server
    /// is down) dialing is refused.
    pub fn rebind(&self) -> MemoryListener {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tx.lock().unwrap() = tx;
        MemoryListener {
            name: self.name.clone(),
            rx: Mutex::new(rx),
        }
    }
}

/// The server side of an in-memory address.
pub struct MemoryListener {
    name: Arc<str>,
    rx: Mutex<mpsc::UnboundedReceiver<DuplexStream>>,
}

/// A new in-memory address, named for messages (`memory://name`), and its listener.
pub fn memory(name: &str) -> (MemoryAddr, MemoryListener) {
    let (tx, rx) = mpsc::unbounded_channel();
    let name: Arc<str> = Arc::from(name);
    (
        MemoryAddr {
            name: name.clone(),
            tx: Arc::new(std::sync::Mutex::new(tx)),
        },
        MemoryListener {
            name,
            rx: Mutex::new(rx),
        },
    )
}

impl fmt::Debug for MemoryAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memory://{}", self.name)
    }
}

/// Where a server's connections come from.
pub enum Listener {
    Tcp(TcpListener),
    Memory(MemoryListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<MemoryListener> for Listener {
    fn from(l: MemoryListener) -> Self {
        Listener::Memory(l)
    }
}

impl Listener {
    /// The next connection. Streamed tokens are small writes: TCP sends each at once.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Memory(l) => match l.rx.lock().await.recv().await {
                Some(s) => Ok(Stream::Memory(s)),
                // Every address is gone: no connection will ever come.
                None => std::future::pending().await,
            },
        }
    }

    /// What it listens on, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Listener::Memory(l) => format!("memory://{}", l.name),
        }
    }
}

/// How a client reaches its server.
#[derive(Clone, Debug)]
pub enum Connector {
    /// `host:port`.
    Tcp(String),
    Memory(MemoryAddr),
}

impl Connector {
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Connector::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Connector::Memory(addr) => {
                let (client, server) = tokio::io::duplex(PIPE_BUFFER);
                let sent = addr.tx.lock().unwrap().send(server);
                sent.map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("{addr:?} is not listening"),
                    )
                })?;
                Ok(Stream::Memory(client))
            }
        }
    }
}

impl fmt::Display for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connector::Tcp(addr) => f.write_str(addr),
            Connector::Memory(addr) => write!(f, "{addr:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_in_memory_connection_carries_bytes_both_ways() {
        let (addr, listener) = memory("engine");
        let listener = Listener::from(listener);
        let connector = Connector::Memory(addr);
        let server = tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
        });
        let mut c = connector.connect().await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"PING");
        server.await.unwrap();
        assert_eq!(connector.to_string(), "memory://engine");
    }

    #[tokio::test]
    async fn dialing_a_dropped_listener_is_refused() {
        let (addr, listener) = memory("gone");
        drop(listener);
        let e = Connector::Memory(addr).connect().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("memory://gone"), "{e}");
    }

    #[tokio::test]
    async fn a_rebound_address_reaches_the_new_listener_and_is_refused_while_it_is_down() {
        let (addr, first) = memory("engine");
        let connector = Connector::Memory(addr.clone());
        connector.connect().await.unwrap();
        assert!(first.rx.lock().await.try_recv().is_ok());
        // Down: the new listener is dropped at once, as a crashed server's port is closed.
        drop(addr.rebind());
        let e = connector.connect().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let second = addr.rebind();
        connector.connect().await.unwrap();
        assert!(second.rx.lock().await.try_recv().is_ok());
        assert!(
            first.rx.lock().await.try_recv().is_err(),
            "the old listener gets nothing"
        );
    }
}
