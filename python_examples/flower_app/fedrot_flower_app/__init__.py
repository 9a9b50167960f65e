"""Flower App: federated LoRA fine-tuning with FedRot-LoRA aggregation (fedrot_ext.flower)."""
