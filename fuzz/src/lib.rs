//! Helpers the fuzz targets share: cutting a stream into reads, and the
//! client's side of WebSocket framing (the server has none: it only reads
//! masked frames).

/// `data` cut into the pieces successive reads would return: one piece for
/// `pattern` 0, else pieces of 1 to 97 bytes in an order `pattern` picks.
pub fn split(data: &[u8], pattern: u8) -> Vec<&[u8]> {
    if pattern == 0 {
        return vec![data];
    }
    let mut out = Vec::new();
    let mut rest = data;
    let mut s = usize::from(pattern);
    while !rest.is_empty() {
        s = (s * 73 + 41) % 251;
        let (piece, tail) = rest.split_at((s % 97 + 1).min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

/// A server frame (as `herald_server::fuzz::websocket::frame` writes it)
/// turned into the frame a client sends: masked with `key`, and with FIN
/// cleared when `fin` is false.
pub fn client_frame(server_frame: &[u8], fin: bool, key: [u8; 4]) -> Vec<u8> {
    let at = match server_frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let mut out = server_frame[..at].to_vec();
    if !fin {
        out[0] &= 0x7F;
    }
    out[1] |= 0x80;
    out.extend_from_slice(&key);
    out.extend(server_frame[at..].iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    out
}
