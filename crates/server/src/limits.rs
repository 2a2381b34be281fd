//! Caps on connections and rates: open WebSocket connections in total and per client IP, new
//! connections per second per IP, publishes per second per API key or token user. Everything but
//! the total is off unless configured.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Limits;
use crate::error::ApiError;

/// The server's limits and their counters.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    connect_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    publish_rate: Option<DefaultKeyedRateLimiter<String>>,
    /// Calls since the rate limiters last forgot idle keys.
    calls: AtomicU64,
}

/// One admitted WebSocket connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<Limiter>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limiter.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip
            && self.limiter.limits.max_connections_per_ip.is_some()
        {
            let mut map = self
                .limiter
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Limiter {
    /// Limits as configured.
    pub fn new(limits: Limits) -> Self {
        let connect_rate = limits
            .connections_per_second_per_ip
            .map(|r| RateLimiter::keyed(Quota::per_second(nonzero(r))));
        let publish_rate = limits.publish_rate.map(|(rate, burst)| {
            RateLimiter::keyed(Quota::per_second(nonzero(rate)).allow_burst(nonzero(burst)))
        });
        Limiter {
            limits,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            connect_rate,
            publish_rate,
            calls: AtomicU64::new(0),
        }
    }

    /// Open WebSocket connections.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The client's IP: the peer's, or — when the peer is a trusted proxy — the nearest address
    /// in `X-Forwarded-For` that is not a trusted proxy.
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?.ip();
        if !self.limits.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        Some(
            forwarded
                .iter()
                .rev()
                .find(|ip| !self.limits.trusted_proxies.contains(ip))
                .or(forwarded.first())
                .copied()
                .unwrap_or(peer),
        )
    }

    fn forget_idle_keys(&self) {
        if self.calls.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            if let Some(l) = &self.connect_rate {
                l.retain_recent();
            }
            if let Some(l) = &self.publish_rate {
                l.retain_recent();
            }
        }
    }

    /// Admit a new WebSocket connection from `ip`, or say why not (503 over the total, 429 over
    /// a per-IP cap or rate).
    pub fn admit_connection(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
    ) -> Result<ConnectionSlot, ApiError> {
        self.forget_idle_keys();
        if let (Some(l), Some(ip)) = (&self.connect_rate, ip)
            && let Err(not_until) = l.check_key(&ip)
        {
            return Err(rate_limited(
                format!(
                    "more than {} new connections per second from {ip}",
                    self.limits.connections_per_second_per_ip.unwrap_or(0)
                ),
                &not_until,
            ));
        }
        let open = self.open.fetch_add(1, Ordering::AcqRel);
        // From here the slot exists: dropping it on an early return gives the place back.
        let mut slot = ConnectionSlot {
            limiter: Arc::clone(self),
            ip: None,
        };
        if open >= self.limits.max_connections {
            return Err(ApiError::Unavailable(format!(
                "the server holds its maximum of {} connections",
                self.limits.max_connections
            )));
        }
        if let (Some(max), Some(ip)) = (self.limits.max_connections_per_ip, ip) {
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= max {
                return Err(ApiError::RateLimited {
                    message: format!("{ip} already holds its maximum of {max} connections"),
                    retry_after_secs: 1,
                });
            }
            *n += 1;
            slot.ip = Some(ip);
        }
        Ok(slot)
    }

    /// Count `n` publishes against `who` (an API key or a token's user).
    pub fn admit_publish(&self, who: &str, n: usize) -> Result<(), ApiError> {
        let Some(l) = &self.publish_rate else {
            return Ok(());
        };
        self.forget_idle_keys();
        let (rate, burst) = self.limits.publish_rate.unwrap_or((1, 1));
        // A batch larger than the burst takes the whole burst.
        let n = nonzero(u32::try_from(n).unwrap_or(u32::MAX).min(burst));
        let key = who.to_owned();
        match l.check_key_n(&key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(rate_limited(
                format!("more than {rate} publishes per second (burst {burst}) for {who}"),
                &not_until,
            )),
            Err(_) => Err(ApiError::RateLimited {
                message: format!("batch larger than the publish burst of {burst}"),
                retry_after_secs: 1,
            }),
        }
    }
}

fn rate_limited(
    message: String,
    not_until: &governor::NotUntil<governor::clock::QuantaInstant>,
) -> ApiError {
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    ApiError::RateLimited {
        message,
        retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 3,
            ..Limits::default()
        }
    }

    #[test]
    fn total_and_per_ip_caps_free_their_place_on_drop() {
        let l = Arc::new(Limiter::new(Limits {
            max_connections_per_ip: Some(2),
            ..limits()
        }));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.admit_connection(Some(a)).unwrap();
        let _s2 = l.admit_connection(Some(a)).unwrap();
        assert!(matches!(
            l.admit_connection(Some(a)),
            Err(ApiError::RateLimited { .. })
        ));
        let _s3 = l.admit_connection(Some(b)).unwrap();
        assert!(matches!(
            l.admit_connection(Some(b)),
            Err(ApiError::Unavailable(_))
        ));
        assert_eq!(l.open_connections(), 3);
        drop(s1);
        assert_eq!(l.open_connections(), 2);
        l.admit_connection(Some(a)).unwrap();
    }

    #[test]
    fn publish_rate_has_a_burst_and_a_retry_after() {
        let l = Limiter::new(Limits {
            publish_rate: Some((1, 2)),
            ..limits()
        });
        l.admit_publish("k", 1).unwrap();
        l.admit_publish("k", 1).unwrap();
        match l.admit_publish("k", 1) {
            Err(ApiError::RateLimited {
                retry_after_secs, ..
            }) => assert!(retry_after_secs >= 1),
            other => panic!("{other:?}"),
        }
        l.admit_publish("other", 2).unwrap();
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let l = Limiter::new(Limits {
            trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
            ..limits()
        });
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 127.0.0.1".parse().unwrap());
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let other: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        assert_eq!(
            l.client_ip(Some(proxy), &h),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(l.client_ip(Some(other), &h), Some(other.ip()));
    }
}
