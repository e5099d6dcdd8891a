"""What each task's answers are made of, torch-free and protocol-free: detection's IoU and
non-max suppression, embeddings' distances, style weights. The service's task plug-ins
(`convserve.service.tasks`) and training both build on these."""
