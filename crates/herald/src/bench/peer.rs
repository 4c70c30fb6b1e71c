//! The HTTP routes of the servers `herald bench` can measure: Herald's own,
//! or Nchan's as bench/nchan.conf lays them out. MQTT needs no such table:
//! every broker speaks the same protocol at `--mqtt`.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Peer {
    /// Herald's routes (DESIGN.md).
    Herald,
    /// Nchan (nginx + libnginx-mod-nchan) with bench/nchan.conf: POST /pub/{ch},
    /// EventSource and WebSocket at /sub/{ch}, long poll at /lp/{ch}.
    Nchan,
}

impl Peer {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Herald => "herald",
            Peer::Nchan => "nchan",
        }
    }

    pub(crate) fn publish_url(self, server: &str, channel: &str) -> String {
        match self {
            Peer::Herald => format!("{server}/api/channels/{channel}"),
            Peer::Nchan => format!("{server}/pub/{channel}"),
        }
    }

    /// Live messages only, from the next one on (Nchan's /sub/ location is
    /// configured with `nchan_subscriber_first_message newest`).
    pub(crate) fn sse_url(self, server: &str, channel: &str) -> String {
        match self {
            Peer::Herald => format!("{server}/api/channels/{channel}/events?since=now"),
            Peer::Nchan => format!("{server}/sub/{channel}"),
        }
    }

    /// Herald multiplexes channels over one socket (subscribed by message);
    /// Nchan subscribes the socket to the channel in its URL.
    pub(crate) fn ws_url(self, server: &str, channel: &str) -> String {
        let ws = server.replacen("http://", "ws://", 1);
        match self {
            Peer::Herald => format!("{ws}/api/ws"),
            Peer::Nchan => format!("{ws}/sub/{channel}"),
        }
    }

    pub(crate) fn longpoll_url(self, server: &str, channel: &str) -> String {
        match self {
            Peer::Herald => format!("{server}/api/channels/{channel}/messages"),
            Peer::Nchan => format!("{server}/lp/{channel}"),
        }
    }
}

/// An HTTP date (RFC 7231 IMF-fixdate) for `secs` since the epoch, as Nchan
/// expects in If-Modified-Since.
pub(crate) fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let s = secs % 86_400;
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Year, month (1-12) and day of the month of a day number counted from
/// 1970-01-01 (Howard Hinnant's algorithm for the proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(1_795_374_691), "Sun, 22 Nov 2026 19:11:31 GMT");
    }
}
