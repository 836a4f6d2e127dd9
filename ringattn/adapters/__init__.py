"""Framework adapters (imported explicitly: ``ringattn.adapters.megatron``)."""
