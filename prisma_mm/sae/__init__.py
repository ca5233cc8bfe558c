"""prisma_mm.sae"""
