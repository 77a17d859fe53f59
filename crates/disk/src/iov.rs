//! iovec lists: the guest buffers of one request, as the block device hands them over.
//! The caller guarantees every iovec points at memory that stays valid while the
//! image works on it.

/// Drops the first `n` bytes from an iovec list (after a short read or write).
pub fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iov.len() && n >= iov[first].iov_len {
        n -= iov[first].iov_len;
        first += 1;
    }
    let rest = &mut iov[first..];
    if let Some(v) = rest.first_mut() {
        // SAFETY: n < iov_len here, so the new base stays inside the same buffer.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
        v.iov_len -= n;
    }
    rest
}

/// Copies the start of the buffers into `out`; returns how many bytes it copied.
pub fn gather(iov: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut n = 0;
    for v in iov {
        let take = v.iov_len.min(out.len() - n);
        // SAFETY: the iovec is valid for iov_len bytes (the caller's guarantee); `out`
        // has room for `take` more bytes; the two never overlap (out is host memory).
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), out[n..].as_mut_ptr(), take)
        };
        n += take;
        if n == out.len() {
            break;
        }
    }
    n
}

/// The iovecs as slices, for the qcow2 driver.
///
/// # Safety
/// Every iovec must point at memory valid for its length for `'a`, not otherwise
/// referenced from Rust while the slices live.
pub unsafe fn slices_mut<'a>(iov: &[libc::iovec]) -> Vec<&'a mut [u8]> {
    iov.iter()
        // SAFETY: the caller's guarantee.
        .map(|v| unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    #[test]
    fn advance_and_gather_walk_the_buffers() {
        let (mut a, mut b) = ([1u8, 2, 3], [4u8, 5]);
        let mut v = [iov(&mut a), iov(&mut b)];
        let mut out = [0u8; 4];
        assert_eq!(gather(&v, &mut out), 4);
        assert_eq!(out, [1, 2, 3, 4]);
        let rest = advance(&mut v, 4);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 1);
        let mut out = [0u8; 8];
        assert_eq!(gather(rest, &mut out), 1);
        assert_eq!(out[0], 5);
    }
}
