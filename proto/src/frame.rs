//! [`CoordinatorFrame`]: a `CoordinatorMessage` encoded once, written as is to every session
//! that sends it.
//!
//! A barrier's release (and any other command the same for many nodes) goes to a whole fleet.
//! The coordinator encodes it once and every session writes the same bytes: the frame is a
//! reference-counted buffer, so a fan-out to N nodes is one encode, and no allocation or
//! encode per node (docs/performance.md, "One encode per fan-out").
//!
//! On the wire a frame *is* a `CoordinatorMessage`: the frames server ([`crate::frames`])
//! serves the same routes as `hotroll.v1.Agent`, and agents decode what it sends with the
//! generated types.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};

use crate::v1::CoordinatorMessage;

/// An encoded `CoordinatorMessage`; cloning it shares the bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CoordinatorFrame {
    encoded: Bytes,
}

impl CoordinatorFrame {
    /// Encode `message` once.
    pub fn encode(message: &CoordinatorMessage) -> Self {
        Self {
            encoded: Bytes::from(message.encode_to_vec()),
        }
    }

    /// The bytes, to keep and share (each clone of them is a reference, not a copy).
    pub fn into_bytes(self) -> Bytes {
        self.encoded
    }

    /// A frame of bytes [`CoordinatorFrame::into_bytes`] gave out.
    pub fn from_bytes(encoded: Bytes) -> Self {
        Self { encoded }
    }

    /// The message this frame carries (for tests and logs; the wire never needs it).
    pub fn decode_message(&self) -> Result<CoordinatorMessage, prost::DecodeError> {
        CoordinatorMessage::decode(self.encoded.clone())
    }
}

impl std::fmt::Debug for CoordinatorFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decode_message() {
            Ok(message) => f.debug_tuple("CoordinatorFrame").field(&message).finish(),
            Err(_) => f
                .debug_struct("CoordinatorFrame")
                .field("bytes", &self.encoded.len())
                .finish_non_exhaustive(),
        }
    }
}

impl Message for CoordinatorFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
    }

    /// Decoding a frame (which nothing on the wire does: agents decode the message) merges the
    /// field into the message and encodes it again, so that a frame always holds a message.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        let mut message = self.decode_message()?;
        message.merge_field(tag, wire_type, buf, ctx)?;
        self.encoded = Bytes::from(message.encode_to_vec());
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    fn clear(&mut self) {
        self.encoded = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{BarrierRelease, coordinator_message::Msg};

    fn release() -> CoordinatorMessage {
        CoordinatorMessage {
            msg: Some(Msg::BarrierRelease(BarrierRelease {
                rollout_id: "01a24f0a-fdeb-71df-be2d-32f303a97189".into(),
                epoch: 3,
                barrier_id: "b2".into(),
                ok: true,
                reason: String::new(),
            })),
        }
    }

    #[test]
    fn a_frame_is_the_message_on_the_wire() {
        let message = release();
        let frame = CoordinatorFrame::encode(&message);
        // What a codec writes for the frame is byte for byte what it writes for the message.
        assert_eq!(frame.encode_to_vec(), message.encode_to_vec());
        assert_eq!(frame.encoded_len(), message.encoded_len());
        assert_eq!(
            frame.encode_length_delimited_to_vec(),
            message.encode_length_delimited_to_vec()
        );
        assert_eq!(
            CoordinatorMessage::decode(&frame.encode_to_vec()[..]),
            Ok(message)
        );
    }

    #[test]
    fn clones_share_the_bytes() {
        let bytes = CoordinatorFrame::encode(&release()).into_bytes();
        let copy = CoordinatorFrame::from_bytes(bytes.clone());
        assert_eq!(copy.into_bytes().as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn decoding_a_frame_keeps_the_message() {
        let message = release();
        let decoded = CoordinatorFrame::decode(&message.encode_to_vec()[..]).expect("decodes");
        assert_eq!(decoded.decode_message(), Ok(message));
        let bad = CoordinatorFrame::decode(&[0x0a, 0xff][..]);
        assert!(bad.is_err(), "{bad:?}");
    }
}
