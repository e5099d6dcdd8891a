"""The Open Inference Protocol (KServe v2): wire types and codec (`types`), HTTP (`http`)."""
