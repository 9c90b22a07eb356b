//! `TcpRing`: the CPU collectives backend. Ranks form a ring over TCP (rank r sends to r+1
//! and receives from r-1) and run ring algorithms: reduce-scatter then all-gather for
//! all-reduce, a pipelined pass for broadcast, and a relay for all-to-all.
//!
//! Determinism: reduced chunk j is summed once, by its owner rank j, in the fixed order
//! `((x[j+1] + x[j+2]) + ...) + x[j]` (indices mod world), and then copied to every rank, so
//! all ranks hold bit-identical results and a rerun with the same inputs gives the same bits.
//!
//! Every message carries a small header (operation, length) so that ranks calling different
//! collectives, or the same one with different sizes, fail with an error instead of reading
//! garbage; every socket read and write has the communicator's timeout.
//!
//! Every operation completes before it returns, so ZeRO-2's bucket reductions
//! (`reduce_sum_pieces`, the trait's default: an all-reduce of the bucket) run inside the
//! backward's hook and `join` has nothing to wait for.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::Tensor;

use super::collectives::{chunk_len, flat_f32, Collectives};

const MAGIC: u32 = u32::from_le_bytes(*b"FTRG");
/// Broadcast is pipelined in pieces of this many bytes so that ranks forward while receiving.
const BROADCAST_PIECE_BYTES: usize = 1 << 20;

/// The listening socket of one process, shared by the world ring and every sub-group split
/// from it. Connections that arrive for a ring other than the one being set up are parked
/// until that ring asks for them.
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
    /// Accepted connections keyed by (ring tag, sender's rank in that ring).
    parked: Mutex<HashMap<(u64, u32), TcpStream>>,
}

impl RingListener {
    /// Binds `addr` (e.g. `127.0.0.1:0` for an ephemeral port, `0.0.0.0:0` across nodes).
    pub fn bind(addr: &str) -> Result<Arc<Self>> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("TcpRing: cannot bind {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(Arc::new(Self {
            listener,
            addr,
            parked: Mutex::new(HashMap::new()),
        }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the connection that rank `from` of ring `tag` makes to us.
    fn accept_from(
        &self,
        tag: u64,
        from: u32,
        world: u32,
        deadline: Instant,
    ) -> io::Result<TcpStream> {
        loop {
            if let Some(s) = self.lock_parked().remove(&(tag, from)) {
                return Ok(s);
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    stream.set_read_timeout(Some(remaining.max(Duration::from_millis(10))))?;
                    let (peer_tag, peer_rank, peer_world) = read_handshake(&stream)?;
                    if peer_tag == tag && peer_rank == from {
                        if peer_world != world {
                            return Err(io::Error::other(format!(
                                "rank {from} believes the ring has {peer_world} ranks, this rank {world}"
                            )));
                        }
                        return Ok(stream);
                    }
                    self.lock_parked().insert((peer_tag, peer_rank), stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "accept timed out"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn lock_parked(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u32), TcpStream>> {
        // A panic while holding the lock leaves the map consistent (single inserts/removes).
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn write_handshake(mut s: &TcpStream, tag: u64, rank: u32, world: u32) -> io::Result<()> {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&tag.to_le_bytes());
    b[12..16].copy_from_slice(&rank.to_le_bytes());
    b[16..20].copy_from_slice(&world.to_le_bytes());
    s.write_all(&b)
}

fn read_handshake(mut s: &TcpStream) -> io::Result<(u64, u32, u32)> {
    let mut b = [0u8; 20];
    s.read_exact(&mut b)?;
    let word = |r: Range<usize>| u32::from_le_bytes(b[r].try_into().expect("4-byte range"));
    if word(0..4) != MAGIC {
        return Err(io::Error::other(
            "a connection that is not an ftrun TcpRing peer",
        ));
    }
    let tag = u64::from_le_bytes(b[4..12].try_into().expect("8-byte range"));
    Ok((tag, word(12..16), word(16..20)))
}

/// The operations, as sent in message headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    ReduceScatter = 1,
    AllGather = 2,
    Broadcast = 3,
    AllToAll = 4,
    Split = 5,
}

impl Op {
    fn name(code: u32) -> &'static str {
        match code {
            1 => "reduce_scatter",
            2 => "all_gather",
            3 => "broadcast",
            4 => "all_to_all",
            5 => "split",
            _ => "unknown",
        }
    }
}

/// One ring communicator. See the module docs.
pub struct TcpRing {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Identifies this ring among the rings sharing the listener (the world ring is 0).
    tag: u64,
    listener: Arc<RingListener>,
    /// Listen addresses of this ring's members, by ring rank.
    addrs: Vec<SocketAddr>,
    /// `None` when world == 1.
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    /// Number of splits made from this ring so far; part of the children's tags.
    splits: std::sync::atomic::AtomicU64,
}

impl TcpRing {
    /// Joins the world ring: `addrs[r]` is rank r's listen address (the coordinator publishes
    /// them), `listener` is this rank's own (bound before its address was published).
    /// Fails if a neighbour does not connect within `timeout`.
    pub fn connect(
        listener: Arc<RingListener>,
        rank: usize,
        addrs: &[String],
        timeout: Duration,
    ) -> Result<Self> {
        let addrs = addrs
            .iter()
            .enumerate()
            .map(|(r, a)| {
                a.to_socket_addrs()
                    .with_context(|| format!("TcpRing: rank {r}'s address {a:?} is not host:port"))?
                    .next()
                    .with_context(|| {
                        format!("TcpRing: rank {r}'s address {a:?} resolves to nothing")
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            rank < addrs.len(),
            "TcpRing: rank {rank} is outside a world of {} addresses",
            addrs.len()
        );
        // The published host may differ (0.0.0.0 bound, routable name published): compare ports.
        ensure!(
            addrs[rank].port() == listener.local_addr().port(),
            "TcpRing: rank {rank}'s published address {} is not this listener's {}",
            addrs[rank],
            listener.local_addr()
        );
        Self::join(listener, rank, addrs, 0, timeout)
    }

    fn join(
        listener: Arc<RingListener>,
        rank: usize,
        addrs: Vec<SocketAddr>,
        tag: u64,
        timeout: Duration,
    ) -> Result<Self> {
        let world = addrs.len();
        let mut ring = Self {
            rank,
            world,
            timeout,
            tag,
            listener,
            addrs,
            next: None,
            prev: None,
            splits: std::sync::atomic::AtomicU64::new(0),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        // Connect first (the peer's kernel backlog completes it even before the peer accepts),
        // then accept: no ordering between ranks is needed.
        let next = connect_until(ring.addrs[next_rank], deadline).with_context(|| {
            format!(
                "TcpRing setup: rank {rank} of {world} could not connect to rank {next_rank} at {} within {timeout:?}",
                ring.addrs[next_rank]
            )
        })?;
        write_handshake(&next, tag, rank as u32, world as u32)?;
        let prev = ring
            .listener
            .accept_from(tag, prev_rank as u32, world as u32, deadline)
            .with_context(|| {
                format!(
                    "TcpRing setup: rank {rank} of {world} timed out after {timeout:?} waiting for rank {prev_rank} to connect"
                )
            })?;
        for s in [&next, &prev] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// Sends `send` to the next rank while receiving `recv.len()` bytes from the previous one.
    /// Sending runs on a scoped thread: with blocking sockets, every rank writing a large
    /// chunk before reading would fill the socket buffers and deadlock the ring.
    fn exchange(&self, op: Op, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let (next, prev) = self.streams();
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| self.send_msg(next, op, send));
            let received = self.recv_msg(prev, op, recv);
            let sent = writer
                .join()
                .map_err(|_| anyhow!("TcpRing {op:?}: sender thread panicked"))?;
            received.and(sent)
        })
    }

    fn streams(&self) -> (&TcpStream, &TcpStream) {
        match (&self.next, &self.prev) {
            (Some(n), Some(p)) => (n, p),
            _ => unreachable!("collectives with world > 1 always have both neighbours"),
        }
    }

    fn send_msg(&self, mut stream: &TcpStream, op: Op, payload: &[u8]) -> Result<()> {
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&(op as u32).to_le_bytes());
        header[4..12].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        stream
            .write_all(&header)
            .and_then(|_| stream.write_all(payload))
            .map_err(|e| self.io_error(op, "sending to", self.next_rank(), e))
    }

    fn recv_msg(&self, mut stream: &TcpStream, op: Op, buf: &mut [u8]) -> Result<()> {
        let from = self.prev_rank();
        let mut header = [0u8; 12];
        stream
            .read_exact(&mut header)
            .map_err(|e| self.io_error(op, "waiting for", from, e))?;
        let peer_op = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let peer_len = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
        if peer_op != op as u32 || peer_len != buf.len() as u64 {
            bail!(
                "TcpRing: rank {} expected {} of {} bytes from rank {from} but got {} of {peer_len} bytes \
                 (ranks must call the same collectives in the same order with equal sizes)",
                self.rank,
                Op::name(op as u32),
                buf.len(),
                Op::name(peer_op)
            );
        }
        stream
            .read_exact(buf)
            .map_err(|e| self.io_error(op, "waiting for", from, e))
    }

    fn io_error(&self, op: Op, what: &str, peer: usize, e: io::Error) -> anyhow::Error {
        let op = Op::name(op as u32);
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            anyhow!(
                "TcpRing {op}: rank {} of {} timed out after {:?} {what} rank {peer}",
                self.rank,
                self.world,
                self.timeout
            )
        } else {
            anyhow!(
                "TcpRing {op}: rank {} of {}: connection error {what} rank {peer}: {e}",
                self.rank,
                self.world
            )
        }
    }

    /// Element bounds of chunk `i` when `len` elements split into `world` chunks (balanced;
    /// equal when `world` divides `len`).
    fn bounds(&self, len: usize, i: usize) -> Range<usize> {
        (i * len / self.world)..((i + 1) * len / self.world)
    }

    /// Ring reduce-scatter in place: afterwards chunk `rank` of `data` holds the sum over all
    /// ranks (other chunks hold partial sums). Returns this rank's chunk range.
    pub fn reduce_scatter_in_place(&self, data: &mut [f32]) -> Result<Range<usize>> {
        let (w, r) = (self.world, self.rank);
        let mine = self.bounds(data.len(), r);
        if w == 1 {
            return Ok(mine);
        }
        let mut scratch = vec![0f32; data.len().div_ceil(w)];
        for step in 0..w - 1 {
            // Send chunk (r - step - 1), receive chunk (r - step - 2) and add our own to it:
            // chunk j starts at rank j+1 and ends, fully summed, at rank j.
            let send = self.bounds(data.len(), (r + 2 * w - step - 1) % w);
            let recv = self.bounds(data.len(), (r + 2 * w - step - 2) % w);
            let incoming = &mut scratch[..recv.len()];
            self.exchange(
                Op::ReduceScatter,
                bytemuck::cast_slice(&data[send]),
                bytemuck::cast_slice_mut(incoming),
            )?;
            for (own, partial) in data[recv].iter_mut().zip(incoming.iter()) {
                // IEEE addition is commutative: this is partial + own, the documented order.
                *own += *partial;
            }
        }
        Ok(mine)
    }

    /// Ring all-gather in place: on entry chunk `rank` of `data` holds this rank's part, on
    /// return every chunk holds its owner's part.
    pub fn all_gather_in_place(&self, data: &mut [f32]) -> Result<()> {
        self.all_gather_bytes(Op::AllGather, bytemuck::cast_slice_mut(data), 4)
    }

    /// All-gather over bytes; chunks are balanced in units of `elem` bytes.
    fn all_gather_bytes(&self, op: Op, data: &mut [u8], elem: usize) -> Result<()> {
        let (w, r) = (self.world, self.rank);
        if w == 1 {
            return Ok(());
        }
        let n_elems = data.len() / elem;
        let byte_bounds = |i: usize| {
            let b = self.bounds(n_elems, i);
            b.start * elem..b.end * elem
        };
        let mut scratch = vec![0u8; n_elems.div_ceil(w) * elem];
        for step in 0..w - 1 {
            // Forward chunk (r - step), receive chunk (r - step - 1).
            let send = byte_bounds((r + w - step) % w);
            let recv = byte_bounds((r + 2 * w - step - 1) % w);
            let incoming = &mut scratch[..recv.len()];
            self.exchange(op, &data[send], incoming)?;
            data[recv].copy_from_slice(incoming);
        }
        Ok(())
    }

    /// Sum over all ranks in place, for any length (chunks need not be equal).
    pub fn all_reduce_sum_in_place(&self, data: &mut [f32]) -> Result<()> {
        self.reduce_scatter_in_place(data)?;
        self.all_gather_in_place(data)
    }

    /// Overwrites `data` with `root`'s on every rank; pipelined along the ring from `root`.
    pub fn broadcast_in_place(&self, data: &mut [f32], root: usize) -> Result<()> {
        let w = self.world;
        ensure!(
            root < w,
            "TcpRing broadcast: root {root} is outside a world of {w}"
        );
        if w == 1 {
            return Ok(());
        }
        let (next, prev) = self.streams();
        let position = (self.rank + w - root) % w; // 0 = root, w-1 = last in the chain
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(data);
        // An empty tensor still sends one (empty) piece so ranks stay in step.
        let n_pieces = bytes.len().div_ceil(BROADCAST_PIECE_BYTES).max(1);
        for p in 0..n_pieces {
            let start = (p * BROADCAST_PIECE_BYTES).min(bytes.len());
            let end = ((p + 1) * BROADCAST_PIECE_BYTES).min(bytes.len());
            let piece = &mut bytes[start..end];
            if position > 0 {
                self.recv_msg(prev, Op::Broadcast, piece)?;
            }
            if position < w - 1 {
                self.send_msg(next, Op::Broadcast, piece)?;
            }
        }
        Ok(())
    }

    /// Equal-chunk all-to-all: input chunk j goes to rank j; output chunk i came from rank i.
    /// A relay along the ring: at step s each rank receives the chunks that rank (r - s) sent
    /// to ranks r, r+1, ..., keeps the first and forwards the rest.
    pub fn all_to_all_vec(&self, data: &[f32]) -> Result<Vec<f32>> {
        let (w, r) = (self.world, self.rank);
        let n = chunk_len(data.len(), w, "TcpRing all_to_all")?;
        let mut out = vec![0f32; data.len()];
        out[r * n..(r + 1) * n].copy_from_slice(&data[r * n..(r + 1) * n]);
        // Our chunks for ranks r+1, r+2, ..., r+w-1, in that order.
        let mut held: Vec<f32> = (1..w)
            .flat_map(|k| {
                let d = (r + k) % w;
                data[d * n..(d + 1) * n].iter().copied()
            })
            .collect();
        for step in 1..w {
            let origin = (r + w - step) % w;
            let mut incoming = vec![0f32; (w - step) * n];
            self.exchange(
                Op::AllToAll,
                bytemuck::cast_slice(&held),
                bytemuck::cast_slice_mut(&mut incoming),
            )?;
            out[origin * n..(origin + 1) * n].copy_from_slice(&incoming[..n]);
            held = incoming.split_off(n);
        }
        Ok(out)
    }

    /// Waits for every rank (an all-reduce of one element: its result depends on all ranks).
    pub fn barrier_now(&self) -> Result<()> {
        let mut token = [0f32];
        self.all_reduce_sum_in_place(&mut token)
    }

    /// See [`Collectives::split`]; returns the concrete ring.
    pub fn split_ring(&self, color: u64) -> Result<TcpRing> {
        let w = self.world;
        let mut colors = vec![0u8; 8 * w];
        colors[8 * self.rank..8 * (self.rank + 1)].copy_from_slice(&color.to_le_bytes());
        self.all_gather_bytes(Op::Split, &mut colors, 8)?;
        let colors: Vec<u64> = colors
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let members: Vec<usize> = (0..w).filter(|&q| colors[q] == color).collect();
        let group_rank = members
            .iter()
            .position(|&q| q == self.rank)
            .expect("this rank has its own color");
        let split_index = self
            .splits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = mix(mix(self.tag ^ mix(split_index + 1)) ^ color);
        let addrs = members.iter().map(|&q| self.addrs[q]).collect();
        Self::join(self.listener.clone(), group_rank, addrs, tag, self.timeout)
            .with_context(|| format!("TcpRing split: color {color}, members {members:?}"))
    }
}

/// splitmix64's finalizer: turns (parent tag, split index, color) into a child ring tag.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        match TcpStream::connect_timeout(&addr, remaining) {
            Ok(s) => return Ok(s),
            // The peer may not be listening yet (e.g. addresses passed explicitly).
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
}

fn to_tensor(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, like.device())?)
}

impl Collectives for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = flat_f32(t, "all_reduce_sum")?;
        self.all_reduce_sum_in_place(&mut v)?;
        to_tensor(v, t)
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = flat_f32(t, "reduce_scatter_sum")?;
        chunk_len(v.len(), self.world, "reduce_scatter_sum")?;
        let mine = self.reduce_scatter_in_place(&mut v)?;
        to_tensor(v[mine].to_vec(), t)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let part = flat_f32(t, "all_gather")?;
        let n = part.len();
        let mut v = vec![0f32; n * self.world];
        v[self.rank * n..(self.rank + 1) * n].copy_from_slice(&part);
        self.all_gather_in_place(&mut v)?;
        to_tensor(v, t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut v = flat_f32(t, "broadcast")?;
        self.broadcast_in_place(&mut v, root)?;
        to_tensor(v, t)
    }

    fn all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        let v = flat_f32(t, "all_to_all")?;
        to_tensor(self.all_to_all_vec(&v)?, t)
    }

    fn barrier(&self) -> Result<()> {
        self.barrier_now()
    }

    fn split(&self, color: u64) -> Result<Box<dyn Collectives>> {
        Ok(Box::new(self.split_ring(color)?))
    }
}
