"""prisma_mm.viz"""
