//! The gRPC codec of every etcd service: prost encoding with buffers sized for
//! etcd's traffic, which is mostly small unary messages.
//!
//! tonic's default codec starts each call with an 8 KiB encode buffer and an
//! 8 KiB decode buffer. A put request and its response are a few hundred
//! bytes, and 8 KiB blocks are too large for the allocator's per-thread
//! caches, so under many concurrent puts those two allocations per call were
//! a measurable share of the server's CPU (see BENCHMARKS.md). The buffers
//! here start at 1 KiB and grow by doubling when a message is larger (a big
//! range, a watch batch), so large messages cost a few extra copies.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a call's encode and decode buffers.
const BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a streaming response is flushed (tonic's default).
const YIELD_BYTES: usize = 32 * 1024;

/// The prost codec with buffers sized for etcd's messages (used by generated code).
#[derive(Debug, Clone)]
pub struct EtcdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for EtcdCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

impl<T, U> Codec for EtcdCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
